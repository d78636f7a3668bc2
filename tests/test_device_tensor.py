"""soo_ext._support.device.device_tensor: host values on the device, without a host sync."""
import pytest
import torch

from soo_ext._support.device import device_tensor

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("values, dtype", [([0.5, 0.25, 1.0], torch.float32),
                                           ([[1, 2], [3, 4]], None), (2.0, torch.float64),
                                           ([], torch.int64)])
def test_equals_torch_tensor(device, values, dtype):
    out = device_tensor(values, device, dtype)
    expected = torch.tensor(values, dtype=dtype)
    assert out.device.type == device and out.dtype == expected.dtype
    assert torch.equal(out.cpu(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copy_does_not_sync():
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            busy = busy @ busy  # queued work the copy must not wait for
        out = device_tensor([1.0, 2.0, 3.0], "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.tolist() == [1.0, 2.0, 3.0]
