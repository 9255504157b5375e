"""Test-wide settings.

Eight host CPU devices let sharding tests build a ("data", "model") = (2, 4) mesh; this must
be set before JAX initialises its backend, hence here. Unsharded code runs on device 0.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# JAX's persistent compilation cache: tests (and the training subprocesses they start)
# build the same programs many times over — every train_gist / Session call jits anew —
# and a compile whose HLO was seen before is then loaded, not recompiled (a tiny
# train_gist's second run: 59 s -> 16 s). Keys cover the HLO, options, devices and JAX
# version, so a kept cache is safe; it lives beside the converted base model.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("MCJAX_CACHE") or os.path.expanduser("~/.cache/mcjax"), "jax-compile-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama():
    """(config, params) of the random-init tiny Llama used across tests."""
    import jax

    from mcjax.base.model import init_params
    from mcjax.config import TINY_LLAMA

    return TINY_LLAMA, init_params(TINY_LLAMA, jax.random.key(7))


@pytest.fixture(scope="session")
def smollm2():
    """The real converted SmolLM2-135M-Instruct (converted on first use, then cached)."""
    from mcjax.base.loading import load_base_model

    return load_base_model("smollm2-135m", progress=False)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs_after_each_module():
    """Drop every jitted program a test module compiled once it is done.

    The whole suite compiles thousands of XLA:CPU executables in one process; kept alive,
    their code mappings approach the kernel's vm.max_map_count (65,530) and the next
    compile segfaults inside LLVM (seen in CI at ~95 % of the suite). Modules share no
    compiled programs, so clearing costs nothing but re-traces of session fixtures' users.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
