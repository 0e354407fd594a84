import torch, time, torch.nn.functional as F
torch.set_num_threads(1)
B,C,H,k=128,32,32,5
def bench(fn, n=10):
    fn(); t=time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter()-t)/n*1e3
for dt in (torch.float32, torch.bfloat16):
  x=torch.randn(B,C,H,H,dtype=dt).contiguous(memory_format=torch.channels_last)
  g=torch.randn(B,C,H,H,dtype=dt).contiguous(memory_format=torch.channels_last)
  w=torch.randn(C,1,k,k,dtype=dt)
  for mask in ([True,False,False],[False,True,False],[True,True,False]):
    f=lambda: torch.ops.aten.convolution_backward(g,x,w,None,[1,1],[2,2],[1,1],False,[0,0],C,mask)
    print(dt, mask, f"{bench(f):.1f} ms")
  # grad_input via conv with flipped weight
  wf=w.flip(2,3)
  print(dt,"gi via conv2d", f"{bench(lambda: F.conv2d(g,wf,padding=2,groups=C)):.1f} ms")
