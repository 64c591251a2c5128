"""OpenAI's online Batch API over the queue: ``/v1/files`` and ``/v1/batches``.

Files live in Redis (one hash per file, with a TTL and a size bound): every gateway replica must
read what another one stored, and Redis is the one store they already share (AOF makes it
durable); a directory would need a shared filesystem. Each batch line becomes an ordinary queue
entry whose request id is derived from the batch id and its ``custom_id`` (resubmitting is a
no-op), at a lower priority than interactive requests. The bookkeeping (validate, submit, count,
write the output files) is done by whichever replica holds the batch's lease, renewed while it
works; a replica killed mid-batch lets the lease lapse and another one carries on from the state
in Redis. Modules: ``files`` (FileStore), ``store`` (BatchStore: the batch objects, leases and
status changes), ``lines`` (input lines in, output lines out), ``worker`` (BatchWorker), ``api``
(the HTTP routes).
"""
