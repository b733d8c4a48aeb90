"""The MLflow tracking path on a PostgreSQL backend store: dumo_ray.tracking's MlflowRun (start, params,
metrics by image count, an artifact, resume by run id) against a real PostgreSQL server the test starts
(tests/postgres_server.py), read back with a fresh MlflowClient and straight from the database."""
import pytest

from dumo_ray.config import load_config
from dumo_ray.tracking import MlflowRun, run_summary
from postgres_server import PostgresUnavailable, postgres_server

# initdb, server start and MLflow's schema migrations: 8-12 s on a 2-core CPU.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    try:
        with postgres_server(tmp_path_factory.mktemp("pg"), database="mlflow") as server:
            yield server
    except PostgresUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture
def mlflow_uri_restored():
    """Whatever MlflowRun leaves process-wide (tracking URI, an active run) is put back for the other tests."""
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    if mlflow.active_run() is not None:
        mlflow.end_run(status="FAILED")
    mlflow.set_tracking_uri(before)


def test_mlflow_run_on_postgres(postgres, tmp_path, monkeypatch, mlflow_uri_restored):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the store's default artifact root is ./mlruns
    uri = postgres.url
    cfg = load_config(None, [f"data.path={tmp_path / 'latents'}", "train.name=pg-run", f"tracking.uri={uri}",
                             "tracking.experiment=dumo-ray-postgres"])

    run = MlflowRun(cfg)
    run_id = run.run_id
    # MlflowRun warns and carries on when the store fails (no driver, no server): that is a failure here.
    assert run_id is not None, f"MlflowRun could not start a run on {postgres.url}"
    run.log_metrics({"loss": 0.5, "mse_v": 0.125}, images=128)
    run.log_metrics({"loss": 0.25}, images=256)
    (tmp_path / "note.txt").write_text("hello")
    run.log_artifact(tmp_path / "note.txt", artifact_path="notes")
    run.end(status="FAILED")  # as a crashed run would; the restart resumes it below
    resumed = MlflowRun(cfg, run_id=run_id)
    assert resumed.run_id == run_id
    resumed.log_metrics({"loss": 0.0625}, images=384)
    resumed.end()

    # Read back through the project's summary and a fresh client of its own.
    # (tracking.uri is left out: it carries the database password, which a param should not keep.)
    expected_params = {k: str(v if v is not None else "null")[:500] for k, v in cfg.flat().items()}
    summary = run_summary(uri, run_id)
    assert set(summary["params"]) == set(expected_params)
    assert {k: v for k, v in summary["params"].items() if k != "tracking.uri"} == \
        {k: v for k, v in expected_params.items() if k != "tracking.uri"}
    assert summary["params"]["train.name"] == "pg-run"
    assert summary["metrics"] == {"loss": 0.0625, "mse_v": 0.125}
    assert summary["status"] == "FINISHED"
    assert summary["artifacts"] == ["notes/note.txt"]
    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == \
        [(128, 0.5), (256, 0.25), (384, 0.0625)]
    experiment = client.get_experiment_by_name("dumo-ray-postgres")
    assert client.get_run(run_id).info.experiment_id == experiment.experiment_id
    assert client.get_run(run_id).info.run_name == "pg-run"

    # The rows live in PostgreSQL (not in a sqlite file or ./mlruns beside the test).
    with postgres.connect() as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT version()")
            assert cur.fetchone()[0].startswith("PostgreSQL")
            cur.execute("SELECT name, status FROM runs WHERE run_uuid = %s", (run_id,))
            assert cur.fetchall() == [("pg-run", "FINISHED")]
            cur.execute("SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'loss' ORDER BY step", (run_id,))
            assert cur.fetchall() == [(128, 0.5), (256, 0.25), (384, 0.0625)]
            cur.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'optim.lr'", (run_id,))
            assert cur.fetchall() == [(expected_params["optim.lr"],)]
            cur.execute("SELECT count(*) FROM params WHERE run_uuid = %s", (run_id,))
            assert cur.fetchone()[0] == len(expected_params)
            cur.execute("SELECT name FROM experiments WHERE experiment_id = %s", (int(experiment.experiment_id),))
            assert cur.fetchall() == [("dumo-ray-postgres",)]
    assert not list(tmp_path.glob("*.db")), "a sqlite store was written instead of (or beside) PostgreSQL"
