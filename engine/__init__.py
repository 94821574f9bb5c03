"""What both workers share: sampling, and (later) pools, batch metadata and the runner."""
