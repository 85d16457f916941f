"""store: the SQL of the gateway, and nothing else (see docs/architecture.md).

It imports no other layer of the gateway (no HL7 parser, no flows model, no
templates): its functions take a Connection and plain records
(``store.records``) and return plain records.

Every statement on a table lives in that table's module (one writer per table,
checked by tests/test_store_layout.py):

- ``messages``: messages (inbound messages, their ACKs, the duplicate check)
- ``executions``: executions (runs of a flow for a message)
- ``outbox``: deliveries (the ordered queue of outbound messages)
- ``logs``: logs (the execution log and its query)
- ``audit``: audit (the operators' audit trail)
- ``apps``: apps, flows (the flows as imported)
- ``meta``: meta (schema version, flows generation)
- ``leases``: cluster_nodes, cluster_buckets, cluster_lease_history (several
  nodes on one PostgreSQL; their own metadata, created in cluster mode only)

Transactions that span tables call those modules and hold no SQL of their own:
``inbound`` (the inbound group commit), ``operator`` (operators' actions),
``retention`` (pruning). ``engine`` holds the database thread, group commit and
locks; ``schema`` the tables and their migrations.
"""
