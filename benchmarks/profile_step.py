"""Where one training step's time goes: torch.profiler over lorakit's and PEFT's step, per method.

For a GPU session (benchmarks/gpu_session.sh): the step tables say *that* a variant is slower;
this says whether the device or the host issuing its kernels is the bottleneck (CPU time per
step against CUDA kernel time) and which ops cost the most.

    .venv/bin/python benchmarks/profile_step.py --device cuda --dtype bfloat16 --methods lora,vera [size flags]
"""

from __future__ import annotations

import argparse

import _common as c
import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.model_args(parser, batch=8, seq=512)
    parser.add_argument("--methods", default="lora,vera", help="comma-separated lorakit method names")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    parser.add_argument("--top", type=int, default=12, help="rows of the op table")
    args = parser.parse_args()
    c.set_threads(args)
    print(c.header(f"Profile of one training step (r={args.rank}, all-linear)"))
    cuda = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    base = c.build_base(args)
    ids = c.inputs(args)
    for method in args.methods.split(","):
        am = c.lorakit_model(base, args, method)
        for lib, model in (("lorakit", am), ("PEFT", c.peft_model_like(base, am, args, method))):
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            step = c.train_stepper(model, opt, ids)
            for _ in range(3):
                step()
            with profile(activities=activities) as prof:
                for _ in range(args.steps):
                    step()
            events = prof.key_averages()
            host_ms = sum(e.self_cpu_time_total for e in events) / 1000 / args.steps
            device_ms = sum(e.self_device_time_total for e in events) / 1000 / args.steps if cuda else 0.0
            launches = sum(e.count for e in events if e.key.startswith("cuda") and "Launch" in e.key) / args.steps
            print(f"\n#### {lib} {method}: host (self CPU) {host_ms:.1f} ms/step, "
                  f"device kernels {device_ms:.1f} ms/step, {launches:.0f} kernel launches/step")
            sort = "self_device_time_total" if cuda else "self_cpu_time_total"
            print(events.table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
            del model, opt, step
        del am
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
