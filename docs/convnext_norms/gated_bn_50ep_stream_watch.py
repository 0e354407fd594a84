# Run from the store's folder: python gated_bn_50ep_stream_watch.py lr05=<run id> ls01=<run id>
# Every 5 min: epoch, val acc and the largest BatchNorm running_var per norm layer (and layer-scale gammas) of two running checkpoints.
import sys, time, torch
runs = dict(a.split("=") for a in sys.argv[1:])  # label=run_id
seen = {}
while True:
    for label, rid in runs.items():
        try:
            st = torch.load(f"mlruns/checkpoints/{rid}.pt", map_location="cpu", weights_only=False)
        except Exception:
            continue
        if seen.get(label) == st["epoch"]:
            continue
        seen[label] = st["epoch"]
        sd = st["parts"]["model"]
        vs = [v.max().item() for k, v in sd.items() if k.endswith("running_var")]
        gam = [v.abs().max().item() for k, v in sd.items() if k.endswith(".gamma")]
        h = st["history"][-1]
        print(f"{label} ep {st['epoch']:2d} val {h['val_acc']:.4f} train_loss {h['train_loss']:.3f} maxvar " + " ".join(f"{v:.3g}" for v in vs)
              + (" |gamma| " + " ".join(f"{g:.3g}" for g in gam) if gam else ""), flush=True)
    time.sleep(300)
