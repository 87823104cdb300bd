"""Mixed precision, written out (Micikevicius et al., Mixed Precision Training, 2018): the five ways train.py
can run, and dynamic loss scaling, the part of fp16 training that torch.amp.GradScaler hides.

Number formats (bits of exponent / mantissa; largest finite value; smallest normal; spacing at 1.0):
    fp32   8 / 23   3.4e38   1.2e-38   1.2e-7
    tf32   8 / 10   (a tensor-core matmul mode: fp32 in and out, inputs rounded to 10 mantissa bits)
    bf16   8 / 7    3.4e38   1.2e-38   7.8e-3
    fp16   5 / 10   65504    6.1e-5    9.8e-4   (subnormals down to 6.0e-8, then zero)

fp16 keeps 3 more mantissa bits than bf16 but has 2**-24 as its floor: many gradients are smaller than that
and flush to zero. Multiplying the loss by a large scale S shifts every gradient up by S (the chain rule is
linear), into fp16's range; dividing by S before the optimizer sees them undoes it. bf16 has fp32's exponent
range, so it needs no scaling.
"""

import contextlib
from dataclasses import dataclass

import torch

from cli import UserError, has_bf16, pick_dtype


@dataclass(frozen=True)
class Precision:
    name: str
    compute: torch.dtype  # matmuls and convolutions run in this dtype (autocast, or the weights' own)
    weights: torch.dtype  # what the parameters and the optimizer state are stored in
    tf32: bool = False  # fp32 matmuls on tensor cores with 10-bit mantissas (NVIDIA Ampere and later)
    loss_scaling: bool = False

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """fp32 master weights with 16-bit compute: autocast casts each matmul's inputs to 16 bits on the fly
        (the weight copies the paper keeps) and keeps precision-sensitive ops (softmax, losses, norms) in
        fp32. With 16-bit weights (bf16-pure) or fp32 compute there is nothing to cast."""
        if self.compute == self.weights:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute)


PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, torch.float32),  # strict: TF32 off
    "tf32": Precision("tf32", torch.float32, torch.float32, tf32=True),
    "fp16": Precision("fp16", torch.float16, torch.float32, loss_scaling=True),
    "bf16": Precision("bf16", torch.bfloat16, torch.float32),
    # bf16 weights and bf16 Adam moments: half the memory of the others, but an update smaller than half a
    # weight's bf16 spacing (1/256 of its size) rounds away, so late small-learning-rate steps are lost. Real
    # recipes keep fp32 optimizer state and master weights, or round stochastically (Zamirai et al. 2020).
    "bf16-pure": Precision("bf16-pure", torch.bfloat16, torch.bfloat16),
}


# Weight dtypes for inference (generate.py --dtype, benchmark.py)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def auto_precision(device: torch.device) -> str:
    """bf16 where the GPU has it (no loss scaling needed), fp32 elsewhere (CPUs emulate 16-bit matmuls)."""
    return "bf16" if pick_dtype("auto", device) == torch.bfloat16 else "fp32"


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a dtype the device cannot compute in, in one line, before any work."""
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda" and dtype == torch.bfloat16 and not has_bf16(device):
        raise UserError(f"this GPU has no {name} (it came with Ampere); use float16 or float32")
    try:  # one small matmul and LayerNorm in that dtype, as a forward pass runs them
        a = torch.ones(8, 8, device=device, dtype=dtype)
        torch.nn.functional.layer_norm(a @ a, (8,)).sum().item()
    except (RuntimeError, TypeError) as e:
        raise UserError(f"{device.type} cannot compute in {name} here ({e})") from e


def check_precision(p: Precision, device: torch.device) -> str | None:
    """Refuse a precision the device cannot run; return a note when it runs but gains nothing there."""
    try:
        check_dtype(p.compute, device)
    except UserError as e:
        raise UserError(f"--precision {p.name}: {e}") from e
    if p.tf32 and device.type != "cuda":
        return f"--precision tf32 is plain fp32 on {device.type} (TF32 is an NVIDIA tensor-core mode)"
    if device.type == "cpu" and p.compute != torch.float32:
        return f"--precision {p.name}: most CPUs emulate 16-bit matmuls, so expect no speed-up"
    return None


def set_matmul_precision(p: Precision) -> None:
    """TF32 is a process-wide switch: on for tf32, off ("highest") for every other precision."""
    torch.set_float32_matmul_precision("high" if p.tf32 else "highest")


class LossScaler:
    """Dynamic loss scaling, with torch.amp.GradScaler's interface and defaults: scale(loss) before
    backward, unscale_(optimizer) before clipping, step(optimizer) (skipped when any gradient is inf or nan),
    update(). The scale halves after an overflow and doubles after growth_interval clean steps, so it settles
    just below the largest scale whose gradients still fit in fp16."""

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.scale_value, self.growth_factor, self.backoff_factor = init_scale, growth_factor, backoff_factor
        self.growth_interval, self.clean_steps = growth_interval, 0
        self.found_inf: bool | None = None  # None until this step's gradients are unscaled

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value  # the backward pass then carries gradients x scale

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.found_inf is not None:  # a second division would shrink the gradients by the scale again
            raise RuntimeError("unscale_() was already called since the last update()")
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        inv = 1.0 / self.scale_value  # a power of two, so dividing is exact
        torch._foreach_mul_(grads, inv)
        # inf * inv is still inf and nan stays nan, so the check can come after the division.
        self.found_inf = not torch.stack([g.isfinite().all() for g in grads]).all().item()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.found_inf is None:
            self.unscale_(optimizer)
        if not self.found_inf:  # an overflowed step would write inf/nan into the weights: skip it instead
            optimizer.step()

    def update(self) -> None:
        if self.found_inf:
            self.scale_value *= self.backoff_factor
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:  # try a larger scale: more gradient bits survive
                self.scale_value *= self.growth_factor
                self.clean_steps = 0
        self.found_inf = None

    def get_scale(self) -> float:
        return self.scale_value

    def state_dict(self) -> dict:  # saved with the optimizer, so a resumed run continues with the same scale
        return {"scale": self.scale_value, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value, self.clean_steps = state["scale"], state["clean_steps"]


class NoScaler:
    """The scaler of the precisions that need none: the same calls, doing nothing."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer) -> None:
        pass

    def step(self, optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass

    def get_scale(self) -> float:
        return 1.0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_scaler(p: Precision, device: torch.device, reference: bool = False):
    """Our LossScaler for fp16, or (reference=True) PyTorch's GradScaler, which benchmark.py and the tests
    run beside it; NoScaler for every other precision."""
    if not p.loss_scaling:
        return NoScaler()
    return torch.amp.GradScaler(device.type) if reference else LossScaler()
