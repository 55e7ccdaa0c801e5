"""The jobs service: asynchronous batches of v2 requests, run as their owner, signed webhooks."""
