// Sends ADT^A04 messages with @medplum/hl7's Hl7Client in its default mode and
// prints, as one JSON line, every answer the connection received.
//
// Usage: node medplum_client.cjs HOST PORT LIMIT_MS COUNT [ack-back]
// Run with NODE_PATH pointing at the node_modules that `make node-peers` fills.
// sendAndWait() is called with the library's defaults: it resolves on the
// application ACK (AA/AE/AR) or a commit error, skipping a CA. LIMIT_MS bounds
// the whole run (the library's default waits forever). "ack-back" switches the
// connection to enhanced mode, so that the client answers every message it
// receives, our ACKs included, with a CA of its own.
// Synthetic patient data only.
"use strict";

const { Hl7Client } = require("@medplum/hl7");
const { Hl7Message } = require("@medplum/core");

const [host, port, limitMs, count, mode] = process.argv.slice(2);
const seen = [];
const replies = [];

function report(extra) {
  process.stdout.write(JSON.stringify({ seen, replies, ...extra }) + "\n");
}

function adt(controlId) {
  return Hl7Message.parse(
    [
      `MSH|^~\\&|MEDPLUM|CLINIC|LSQ|LeadSquared|20240301090000||ADT^A04|${controlId}|P|2.5|||AL|AL`,
      "EVN|A04|20240301090000",
      "PID|1||MRN900^^^CLINIC||Sample^Sam||19800101|M",
    ].join("\r"),
  );
}

const timer = setTimeout(() => {
  report({ timedOut: true });
  process.exit(3);
}, Number(limitMs));

async function main() {
  const client = new Hl7Client({ host, port: Number(port) });
  const connection = await client.connect();
  if (mode === "ack-back") {
    connection.setEnhancedMode(true);
  }
  connection.addEventListener("message", (event) => {
    const msa = event.message.getSegment("MSA");
    seen.push({
      code: msa?.getField(1)?.toString() ?? "",
      control_id: msa?.getField(2)?.toString() ?? "",
      msh10: event.message.getSegment("MSH")?.getField(10)?.toString() ?? "",
    });
  });
  connection.addEventListener("error", (event) => {
    report({ error: String(event.error?.message ?? event.error) });
  });
  for (let n = 1; n <= Number(count); n++) {
    const reply = await client.sendAndWait(adt(`MP${n}`));
    const msa = reply.getSegment("MSA");
    replies.push({
      code: msa?.getField(1)?.toString() ?? "",
      control_id: msa?.getField(2)?.toString() ?? "",
    });
  }
  clearTimeout(timer);
  // Let an "ack-back" CA to the last answer reach the gateway before closing.
  await new Promise((resolve) => setTimeout(resolve, 200));
  await client.close();
  report({ timedOut: false });
}

main().catch((error) => {
  report({ timedOut: false, error: String(error?.message ?? error) });
  process.exit(2);
});
