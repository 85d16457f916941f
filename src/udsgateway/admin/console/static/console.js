// udsgateway console: the variable picker. No inline script anywhere (CSP).
// A click on a catalogue variable (or Enter/Space on it) inserts its Liquid
// expression at the cursor of the template edited last, then fires "input"
// so that the live preview renders again.
(function () {
  "use strict";
  var lastTemplate = null;
  document.addEventListener("focusin", function (event) {
    if (event.target && event.target.matches && event.target.matches("textarea.template")) {
      lastTemplate = event.target;
    }
  });
  document.addEventListener("click", function (event) {
    var button = event.target && event.target.closest ? event.target.closest("button[data-insert]") : null;
    if (!button) {
      return;
    }
    event.preventDefault();
    var target = lastTemplate && document.body.contains(lastTemplate)
      ? lastTemplate : document.querySelector("textarea.template");
    if (!target) {
      return;
    }
    var text = button.getAttribute("data-insert");
    var start = target.selectionStart, end = target.selectionEnd;
    target.value = target.value.slice(0, start) + text + target.value.slice(end);
    target.focus();
    target.selectionStart = target.selectionEnd = start + text.length;
    target.dispatchEvent(new Event("input", { bubbles: true }));
  });
})();
