#!/usr/bin/env python3
"""Why cache positions close gaps rarely: re-rotating an f16 key by one position at every step
(StreamingLLM's literal scheme, for a sink) against rotating it once by the total.

Pure Python (struct's 'e' format rounds to IEEE half): 64-dim keys, rope base 100,000 (the
default model's), 20,000 steps. Prints, per trial, the largest relative error of the key and
the change of its attention logit q.k/8 for a random query. Takes a few minutes.
"""
import math, random, struct
random.seed(0)
d=64; theta=100000.0
inv=[1.0/theta**(2*i/d) for i in range(d//2)]
def h(x): return struct.unpack('e', struct.pack('e', x))[0]
def rot(x,p,half=False):
    y=[0.0]*d
    for i,f in enumerate(inv):
        a=p*f; c=math.cos(a); s=math.sin(a)
        y0=x[2*i]*c-x[2*i+1]*s; y1=x[2*i]*s+x[2*i+1]*c
        y[2*i]=h(y0) if half else y0; y[2*i+1]=h(y1) if half else y1
    return y
N=20000
for trial in range(4):
    k=[h(random.gauss(0,3)) for _ in range(d)]
    q=[random.gauss(0,3) for _ in range(d)]
    cur=k
    for i in range(N): cur=rot(cur,1,True)
    ex=rot(k,N)
    dl=abs(sum(a*b for a,b in zip(q,cur))-sum(a*b for a,b in zip(q,ex)))/8
    lg=abs(sum(a*b for a,b in zip(q,ex)))/8
    err=max(abs(a-b) for a,b in zip(cur,ex))/max(abs(b) for b in ex)
    print(f"trial {trial}: max rel elem err {err:.4f}, logit shift {dl:.4f} (|logit| {lg:.2f})",flush=True)
