"""Training: config loading, the step loop, schedule, logging."""
