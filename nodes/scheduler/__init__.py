"""The job scheduler (mesh.scheduler.v1): durable priority queues, leases, retries, cron."""
