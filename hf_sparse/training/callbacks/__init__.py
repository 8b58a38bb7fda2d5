"""The Trainer callbacks and what they run: sparsity telemetry, the dense -> 2:4 auto switch,
the numerics guard, preemption, in-loop lm-eval, checkpoints and model cards; their place in
the callback list."""
