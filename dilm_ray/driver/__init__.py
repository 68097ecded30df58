"""The Ray driver layer: connecting to Ray, stages 1-2 on Ray Train, and the executors of evaluation jobs."""
