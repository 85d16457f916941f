"""Several gateway nodes on one PostgreSQL: node heartbeats, bucket leases, fencing."""
