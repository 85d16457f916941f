// Reference server: @medplum/hl7 (npm), parse and ACK, store nothing.
//
// Hl7Server hands each connection's parsed messages (Hl7Message from @medplum/core) to the
// 'message' listener; message.buildAck() gives MSA-1 = AA and MSA-2 = MSH-10.
//
//   NODE_PATH=bench/peers/node/node_modules node bench/refservers/medplum_server.js PORT
//
// Known limit (@medplum/hl7 4.5.2, Hl7Connection): it buffers until a read *ends* with FS CR and
// parses the whole buffer as one message, so two frames that arrive in one read get a single ACK.
// Stop-and-wait senders never trigger it; pipelined ones do.
'use strict';

const { Hl7Server } = require('@medplum/hl7');

const port = Number(process.argv[2] || 27301);

const server = new Hl7Server((connection) => {
  connection.addEventListener('message', ({ message }) => {
    connection.send(message.buildAck());
  });
  connection.addEventListener('error', (event) => {
    console.error('medplum error:', event.error && event.error.message);
  });
});

server.start(port);
console.log('@medplum/hl7 listening on ' + port);

function stop() {
  server.stop({ forceDrainTimeoutMs: 1000 }).finally(() => process.exit(0));
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
