"""The curvature components the optimizers are composed of, each testable alone: the L-BFGS
history, the dense inverse Hessian, size-bucketed Kronecker factors and what K-FAC and Shampoo
build on them, grafting, mL-BFGS pairs, and DRSOM's Hessian models and trust region; the
cost-aware refresh schedule (refresh_schedule.RefreshSchedule) of K-FAC's and Shampoo's intervals."""
