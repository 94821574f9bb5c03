"""The decode worker process: reservations, state admission, continuous-batching decode, token streams."""
