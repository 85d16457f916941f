// Reference server: simple-hl7 (npm), parse and ACK, store nothing.
//
// Uses the library's own MLLP server exactly as its README shows: hl7.tcp() parses every frame
// with simple-hl7's parser and prepares res.ack (MSA-1 = AA, MSA-2 = MSH-10); res.end() sends it.
//
//   NODE_PATH=bench/peers/node/node_modules node bench/refservers/simple_hl7_server.js PORT
//
// Known limit of the library's server (simple-hl7 3.3.0, lib/server/tcp-server.js): it buffers
// until a read *ends* with FS CR and parses the whole buffer as one message, so two frames that
// arrive in one read get a single ACK. Stop-and-wait senders never trigger it; pipelined ones do.
'use strict';

const hl7 = require('simple-hl7');

const port = Number(process.argv[2] || 27201);
const app = hl7.tcp();

app.use(function (req, res, next) {
  // req.msg is the parsed message; res.ack is the ACK the library built from it.
  res.end();
});

app.use(function (err, req, res, next) {
  console.error('simple-hl7 error:', err && err.message);
  if (res && res.ack) {
    res.ack.getSegment('MSA').setField(1, 'AE');
    res.end();
  }
});

app.start(port);
console.log('simple-hl7 listening on ' + port);

function stop() {
  app.stop();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
