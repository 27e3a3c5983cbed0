"""Linear probe: L2-regularised multinomial logistic regression on frozen features.

The objective is scikit-learn's lbfgs one, f(W, b) = mean cross-entropy + lam/2 ||W||^2 (the bias is not
penalised), so C = 1 / (lam * n). The strength is chosen on a validation split by a coarse-to-fine log
search with warm starts, then the model is refit on train + validation.

Solvers (well-kept L-BFGS implementations; only the objective is ours):
  CPU  scipy's L-BFGS-B, the one scikit-learn calls, on a fused numpy loss and gradient: one float32
       BLAS product each way in class-major layout, float64 reductions.
  GPU  torch.optim.LBFGS with a strong-Wolfe line search on the same objective.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from threadpoolctl import ThreadpoolController

SEARCH_GRID = tuple(10.0 ** np.arange(2, -7, -1))
REFINE_STEPS = (0.5, 0.25)


class LogReg:
    """The probe objective on fixed data; fit(lam, init) returns (W [D, C], b [C])."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n_classes: int, history: int = 10,
                 solver: str | None = None):
        self.n, self.d, self.c, self.history = len(x), x.shape[1], n_classes, history
        self.device = x.device
        self.solver = solver or ("scipy" if x.device.type == "cpu" else "torch")
        if self.solver not in ("scipy", "torch") or (self.solver == "scipy" and x.device.type != "cpu"):
            raise ValueError(f"probe solver {self.solver!r} does not run on {x.device}")
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
        self.x1t = x1.T.contiguous()                              # [D+1, N]: both products read it
        self.y = y
        self.onehot = F.one_hot(y, n_classes).to(x.dtype)
        if self.solver == "scipy":
            self.x1t_np = self.x1t.numpy()
            self.target = self.onehot.numpy().T.astype(np.float64)   # [C, N]
            self.rows = (y.numpy(), np.arange(self.n))
        self.mask = np.ones((self.d + 1, n_classes))
        self.mask[-1] = 0                                          # the bias row is not penalised
        self.mask = self.mask.reshape(-1)

    # -- CPU: scipy ------------------------------------------------------------------------------

    def _loss_grad_np(self, theta: np.ndarray, lam: float) -> tuple[float, np.ndarray]:
        w = theta.reshape(-1, self.c).astype(np.float32)
        z = (w.T @ self.x1t_np).astype(np.float64)                 # [C, N] logits
        top = z.max(0)
        e = np.exp(z - top)
        total = e.sum(0)
        loss = float((np.log(total) + top - z[self.rows]).mean())
        residual = ((e / total - self.target) * (1.0 / self.n)).astype(np.float32)
        grad = (self.x1t_np @ residual.T).reshape(-1).astype(np.float64)
        penalised = theta * self.mask
        return loss + 0.5 * lam * float(penalised @ penalised), grad + lam * penalised

    def _fit_cpu(self, lam, theta, tol, max_iter):
        with _scipy_blas_single_threaded():
            res = minimize(self._loss_grad_np, theta, args=(lam,), jac=True, method="L-BFGS-B",
                           options={"maxiter": max_iter, "maxcor": self.history, "gtol": tol, "maxls": 50,
                                    "ftol": 64 * np.finfo(float).eps})      # scikit-learn's settings
        self.iterations = int(res.nit)
        return res.x

    # -- GPU: torch ------------------------------------------------------------------------------

    def _fit_torch(self, lam, theta, tol, max_iter):
        mask = torch.as_tensor(self.mask, dtype=self.x1t.dtype, device=self.device)
        param = torch.as_tensor(theta, dtype=self.x1t.dtype, device=self.device).clone().requires_grad_()
        opt = torch.optim.LBFGS([param], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                                history_size=self.history, line_search_fn="strong_wolfe")

        def closure():
            with torch.no_grad():
                z = (self.x1t.T @ param.view(-1, self.c)).double()
                lse = torch.logsumexp(z, 1)
                loss = (lse - z.gather(1, self.y[:, None])[:, 0]).mean()
                residual = ((torch.exp(z - lse[:, None]) - self.onehot) / self.n).to(param.dtype)
                penalised = param * mask
                param.grad = (self.x1t @ residual).reshape(-1) + lam * penalised
                return loss + 0.5 * lam * (penalised.double() ** 2).sum()
        opt.step(closure)
        self.iterations = int(opt.state[param]["n_iter"])
        return param.detach().cpu().double().numpy()

    def fit(self, lam: float, init=None, tol: float = 1e-4, max_iter: int = 1000):
        theta = (np.zeros((self.d + 1) * self.c) if init is None else
                 np.concatenate([_np(init[0]), _np(init[1])[None]]).reshape(-1).astype(np.float64))
        fit = self._fit_cpu if self.solver == "scipy" else self._fit_torch
        w = fit(float(lam), theta, tol, max_iter).reshape(-1, self.c)
        as_tensor = lambda a: torch.as_tensor(a, dtype=self.x1t.dtype, device=self.device)  # noqa: E731
        return as_tensor(w[:-1]), as_tensor(w[-1])


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


@contextlib.contextmanager
def _scipy_blas_single_threaded():
    """scipy ships its own OpenBLAS beside numpy's. L-BFGS-B's vector updates are tiny, and when both
    pools spin on 2 cores each call waits for the other's threads to yield: the search ran 10-20x
    slower (measured) unless scipy's pool is held to one thread while numpy's keeps all cores."""
    controller = ThreadpoolController()
    scipy_blas = [c.filepath for c in controller.lib_controllers
                  if c.user_api == "blas" and Path(c.filepath).parent.name == "scipy.libs"]
    if not scipy_blas:
        yield
        return
    with controller.select(filepath=scipy_blas).limit(limits=1):
        yield


def score(pred: np.ndarray, y: np.ndarray, metric: str) -> float:
    if metric == "mean_per_class":
        return 100 * float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))
    return 100 * float((pred == y).mean())


def search_strength(fit, predict, y_val: np.ndarray, metric: str, grid=SEARCH_GRID, refine=REFINE_STEPS):
    """Coarse-to-fine search of the L2 strength on validation: the log grid from strong to weak
    (each fit warm-started from the previous), then best*10^(+-step) for each refine step.
    fit(lam, init) -> state; predict(state) -> labels. Ties keep the stronger regularisation."""
    history, best, state = [], None, None
    for lam in grid:
        state = fit(lam, state)
        acc = score(predict(state), y_val, metric)
        history.append((float(lam), acc))
        if best is None or acc > best[1]:
            best = (float(lam), acc, state)
    for step in refine:
        center = best
        for lam in (center[0] * 10 ** step, center[0] * 10 ** -step):
            st = fit(lam, center[2])
            acc = score(predict(st), y_val, metric)
            history.append((float(lam), acc))
            if acc > best[1] or (acc == best[1] and lam > best[0]):
                best = (float(lam), acc, st)
    return best, history


def val_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(len(labels))
    n_val = max(1, int(round(len(labels) * fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _sklearn_fit(x: np.ndarray, y: np.ndarray, lam: float, init=None, max_iter=1000, tol=1e-4):
    """The reference: scikit-learn's LogisticRegression(lbfgs) with C = 1 / (lam * n), warm-started."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=1.0 / (lam * len(y)), solver="lbfgs", max_iter=max_iter, tol=tol,
                             warm_start=init is not None)
    if init is not None:
        clf.coef_, clf.intercept_ = init[0].T.copy(), init[1].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf.coef_.T.copy(), clf.intercept_.copy()


def linear_probe(train_x, train_y, test_x, test_y, *, n_classes: int, metric="accuracy", val=None,
                 val_fraction=0.2, seed=0, device="cpu", max_iter=1000, backend="ours", tol=1e-4) -> dict:
    """val = (val_x, val_y) or None (then a fixed part of train is held out for the search).
    backend "sklearn" runs the same split, standardisation and search with scikit-learn's estimator."""
    if val is None:
        tr, va = val_split(train_y, val_fraction, seed)
        (train_x, val_x), (train_y, val_y) = (train_x[tr], train_x[va]), (train_y[tr], train_y[va])
    else:
        val_x, val_y = val
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6         # standardise with train statistics
    xtr, xva, xte = ((a - mean) / std for a in (train_x, val_x, test_x))
    yall = np.concatenate([train_y, val_y])
    start = time.perf_counter()
    if backend == "ours":
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device)   # noqa: E731
        xtr, xva, xte = t(xtr), t(xva), t(xte)
        def fit(x, y):
            solver = LogReg(x, torch.from_numpy(np.asarray(y)).long().to(device), n_classes)
            return lambda lam, init: solver.fit(lam, init, tol=tol, max_iter=max_iter)
        predict = lambda x: lambda st: (x @ st[0] + st[1]).argmax(1).cpu().numpy()            # noqa: E731
        fit_all = fit(torch.cat([xtr, xva]), yall)
    elif backend == "sklearn":
        fit = lambda x, y: lambda lam, init: _sklearn_fit(x, y, lam, init, max_iter, tol)  # noqa: E731
        predict = lambda x: lambda st: (x @ st[0] + st[1]).argmax(1)                   # noqa: E731
        fit_all = fit(np.concatenate([xtr, xva]), yall)
    else:
        raise ValueError(f"unknown probe backend {backend!r} (ours or sklearn)")
    (lam, val_acc, state), history = search_strength(fit(xtr, train_y), predict(xva), val_y, metric)
    pred = predict(xte)(fit_all(lam, state))
    return {"accuracy": score(pred, test_y, metric), "top1": score(pred, test_y, "accuracy"),
            "mean_per_class": score(pred, test_y, "mean_per_class"), "metric": metric, "lambda": lam,
            "C": 1.0 / (lam * len(yall)), "val_accuracy": val_acc, "search": history, "backend": backend,
            "seconds": time.perf_counter() - start}
