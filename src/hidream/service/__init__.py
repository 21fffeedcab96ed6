"""The prediction API service: HTTP routes, task store (the queue), storage, worker, keys and billing."""
