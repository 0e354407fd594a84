import torch, copy
import torch.nn.functional as F
from bench.config import load
from bench.models import create_model
from bench.models.depthwise import DepthwiseConv2d
torch.set_num_threads(1)
exp=load("experiments/gated_bn.toml")
torch.manual_seed(0)
base=create_model(**exp.model.__dict__).to(memory_format=torch.channels_last)
x=torch.randn(128,3,32,32).contiguous(memory_format=torch.channels_last); y=torch.randint(0,10,(128,))
def grads(fused):
    m=copy.deepcopy(base)
    for mod in m.modules():
        if isinstance(mod, DepthwiseConv2d): mod.fused_weight_grad=fused
    cm=torch.compile(m, dynamic=False)
    torch.manual_seed(1)
    with torch.autocast("cpu",dtype=torch.bfloat16):
        loss=F.cross_entropy(cm(x).float(),y)
    loss.backward()
    return {n:p.grad.clone() for n,p in m.named_parameters()}
import sys
if sys.argv[1:]==["eager"]:
    def eager():
        m=copy.deepcopy(base); torch.manual_seed(1)
        with torch.autocast("cpu",dtype=torch.bfloat16):
            loss=F.cross_entropy(m(x).float(),y)
        loss.backward(); return {n:p.grad.clone() for n,p in m.named_parameters()}
    a=grads(False); b=eager()
else:
    a=grads(True); b=grads(False)
worst=0
for n in a:
    rel=((a[n]-b[n]).norm()/b[n].norm()).item()
    worst=max(worst,rel)
    if "residual.0" in n: print(n, f"{rel:.2e}")
print("worst relative difference over all params", f"{worst:.2e}")
