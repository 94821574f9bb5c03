"""The prefill worker process: ragged prefill batches, the first token, the state push to a decode worker."""
