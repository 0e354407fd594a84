# Residual-stream size: the largest running_var of each block's norm, in the gated_bn 15-epoch finals' models
import mlflow, torch
mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
c = mlflow.MlflowClient()
exp = c.get_experiment_by_name("gated_bn")
for r in c.search_runs([exp.experiment_id], "tags.`bench.kind` = 'confirm' and attributes.status = 'FINISHED'"):
    model = mlflow.pytorch.load_model(f"runs:/{r.info.run_id}/model", map_location="cpu")
    sd = model.state_dict()
    vs = {k.split(".running_var")[0]: v.max().item() for k, v in sd.items() if k.endswith("running_var")}
    print(r.data.tags.get("bench.recipe"), "seed", r.data.tags.get("bench.seed"), " ".join(f"{v:.3g}" for v in vs.values()))
