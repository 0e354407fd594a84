"""A run's final metrics and per-epoch validation accuracy: python docs/convnext_norms/run_metrics.py RUN_ID ..., run beside mlruns/."""
import sys
import mlflow
mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
c = mlflow.MlflowClient()
for rid in sys.argv[1:]:
    r = c.get_run(rid)
    print(rid, r.data.tags.get("mlflow.runName"), {k: v for k, v in r.data.params.items() if k in ("label_smoothing", "ema", "epochs", "seed")})
    for k, v in sorted(r.data.metrics.items()):
        if k.startswith("test") or k in ("best_val_acc", "final_val_acc", "total_seconds", "mean_epoch_seconds", "train_acc"):
            print(f"  {k} {v:.4f}")
    print("  val", [round(m.value, 4) for m in sorted(c.get_metric_history(rid, "val_acc"), key=lambda m: m.step)])
