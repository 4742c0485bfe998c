"""Bop optimizer: moving average of gradients, sign flips where |m| >= tau and sign(m) == sign(w)."""
import torch


class Bop(torch.optim.Optimizer):
    def __init__(self, params, ar=1e-3, tau=1e-6, init_average="zero", track_flips=True):
        super().__init__(params, dict(ar=ar, tau=tau))
        self.init_average = init_average

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "moving_average" not in st:
                    st["moving_average"] = torch.zeros_like(p) if self.init_average == "zero" else p.grad.clone()
                    st["flips"] = torch.zeros((), dtype=torch.int64, device=p.device)
                    if self.init_average == "first_grad":
                        st["moving_average"].add_(p.grad * g["ar"])
                        m = st["moving_average"]
                    else:
                        m = st["moving_average"]
                        m.mul_(1 - g["ar"]).add_(p.grad * g["ar"])
                else:
                    m = st["moving_average"]
                    m.mul_(1 - g["ar"]).add_(p.grad * g["ar"])
                flip = (m.abs() >= g["tau"]) & (torch.sign(m) == torch.sign(p)) & (p != 0)
                st["flips"] += flip.sum()
                p.copy_(torch.where(flip, -p, p))

    def flip_counts(self):
        return [self.state[p].get("flips", torch.zeros((), dtype=torch.int64)) for g in self.param_groups for p in g["params"]]

    def reset_flip_counts(self):
        for g in self.param_groups:
            for p in g["params"]:
                if "flips" in self.state[p]:
                    self.state[p]["flips"].zero_()

    def set_ar(self, ar):
        for g in self.param_groups:
            g["ar"] = ar

    def set_tau(self, tau):
        for g in self.param_groups:
            g["tau"] = tau
