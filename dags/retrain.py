"""
### retrain

Fine-tunes the image model on the **published** labels whenever a new labels run is
published (the `likerank_labels` Asset), or when triggered by hand (`make retrain`).

`launch` → `wait` → `evaluate` → `register` (emits `likerank_model`):

- **launch** starts `training.train` on the published labels with `training.backend`:
  `local` runs torchrun inside the task (blocking), `kubernetes` creates a Kubeflow
  PyTorchJob. The model run id is derived from this DAG run's id, so a retried task
  resumes the same run from its last checkpoint instead of starting over. It runs on the
  `training.queue` (default `train`: the GPU workers).
- **wait** polls the PyTorchJob (kubernetes) and checks the run completed.
- **evaluate** returns the run's val/test metrics summary (`models/<run>/metrics.json`).
- **register** points `models/latest.json` at the run.

Config: the `[training]` and `[storage]` sections (`likerank config show`).
"""

from __future__ import annotations

from airflow.sdk import dag, task
from likerank_assets import DEFAULT_ARGS, LABELS, MODEL, START_DATE
from likerank_routing import train_routing


@dag(
    dag_id="retrain",
    schedule=[LABELS],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["likerank", "training"],
    doc_md=__doc__,
)
def retrain():
    @task(**train_routing())
    def launch(dag_run_id: str) -> dict:
        from training.launch import launch as start_training

        return start_training(run_tag=dag_run_id)

    @task
    def wait(job: dict) -> dict:
        from training.launch import wait as wait_for_training

        return wait_for_training(job)

    @task
    def evaluate(job: dict) -> dict:
        from training.registry import evaluate_run

        return evaluate_run(job["run_id"])

    @task(outlets=[MODEL])
    def register(summary: dict) -> dict:
        from training.registry import register_run

        return register_run(summary["run_id"])

    register(evaluate(wait(launch(dag_run_id="{{ run_id }}"))))


retrain()
