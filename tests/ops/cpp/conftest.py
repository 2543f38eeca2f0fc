"""Fixtures of the C++ / CUDA C++ op tests."""
import pytest


@pytest.fixture
def grid_cap_3():
    """Every grid-stride CUDA kernel's grid capped at 3 blocks (test hook), so small inputs walk the loops."""
    import tntkernels._C as C

    before = C._set_grid_cap_for_tests(3)
    yield
    C._set_grid_cap_for_tests(before)
