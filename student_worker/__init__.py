"""Student worker: the training driver (the job's entry point), worker actors, the step, evaluation."""
