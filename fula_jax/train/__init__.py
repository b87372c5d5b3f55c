"""Training the model zoo: train state, the (adversarial) loop, checkpoints, and reuse of
finished models by the studies."""
