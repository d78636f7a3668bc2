"""Fixtures and helpers shared by the test modules (the helpers: ``from conftest import ...``)."""
import copy
import io

import pytest
import torch
from torch import nn


def pytest_addoption(parser):
    parser.addoption("--cuda-emu-as-cpu", action="store_true",
                     help="run the CUDA kernels, emulated on the CPU (tests/cuda_emu), in place of "
                          "the soo ops' CPU kernels")


def pytest_configure(config):
    if config.getoption("--cuda-emu-as-cpu"):
        import cuda_emu
        config._cuda_emu_lib = cuda_emu.install_as_cpu_kernels()


# CUDA results are compared with the CPU's at float32 tolerances: no TF32 (cuDNN convolutions use
# it by default, which alone moves a CNN's K-FAC steps by ~1e-3 relative).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def _one_thread():
    """Small problems and smoke runs: more threads only add overhead, much more on a busy host
    (there LAPACK's eigh with 2 threads was 10-100x slower than with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


one_thread = pytest.fixture(_one_thread, name="one_thread")
# For a whole module: pytestmark = pytest.mark.usefixtures("one_thread_per_module").
one_thread_per_module = pytest.fixture(_one_thread, scope="module", name="one_thread_per_module")


def count_host_syncs(monkeypatch):
    """A one-element list counting the tensor-to-host reads from now on (reset it to 0 at will)."""
    count = [0]
    for name in ("tolist", "item", "__bool__", "__float__", "__int__", "__index__", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


def rel_err(out, ref):
    """``||out - ref|| / ||ref||`` in float64 on the CPU."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------
# Resuming from a state dict

def saved_copy(obj, via_bytes):
    """``obj`` as torch.save and torch.load give it back (``via_bytes``), or a deep copy."""
    if not via_bytes:
        return copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def _assert_equal(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], (where, key))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for x, y in zip(a, b):
            _assert_equal(x, y, where)
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def assert_state_equal(opt_a, params_a, opt_b, params_b, ignore=()):
    """The same state entries for every param, equal bit for bit (tensors, also inside lists and
    dicts, of one dtype) or equal (the rest); the values of ``ignore`` are not compared."""
    for pa, pb in zip(params_a, params_b):
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert set(sa) == set(sb)
        for key in set(sa) - set(ignore):
            _assert_equal(sa[key], sb[key], key)


# ---------------------------------------------------------------------------------------------
# Small regression problems (mean squared error)

def mse_backward(model, batch):
    model.zero_grad()
    loss = nn.functional.mse_loss(model(batch[0]), batch[1])
    loss.backward()
    return loss


def mse_steps(opt, model, batches):
    """One step per batch."""
    for batch in batches:
        mse_backward(model, batch)
        opt.step()


# ---------------------------------------------------------------------------------------------
# Training on MNIST-1D

@pytest.fixture(scope="module")
def mnist1d():
    data_module = pytest.importorskip("mnist1d.data")
    args = data_module.get_dataset_args()
    args.seed = 0
    data = data_module.make_dataset(args)
    return (torch.tensor(data["x"], dtype=torch.float32),
            torch.tensor(data["y"], dtype=torch.long))


def mnist1d_mlp(hidden=128):
    return nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_mnist1d(data, make_model, make_opt, steps, seed=0):
    """``steps`` minibatch steps (128 samples) of ``make_opt(model)``; returns the loss on all the
    data before and after, and the optimizer."""
    inputs, labels = data
    torch.manual_seed(seed)
    model = make_model()
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(seed)

    def full_loss():
        with torch.no_grad():
            return nn.functional.cross_entropy(model(inputs), labels).item()
    initial = full_loss()
    for _ in range(steps):
        idx = torch.randint(0, len(inputs), (128,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(inputs[idx]), labels[idx]).backward()
        opt.step()
    return initial, full_loss(), opt
