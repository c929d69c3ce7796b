"""Programs people run: the `accel` CLI, benchmarks, the Gradio app, the batch script."""
