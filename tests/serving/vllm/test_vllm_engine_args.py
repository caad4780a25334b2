"""``loramerge serve`` forwards engine options to vLLM's own parser: ``--engine-arg KEY=VALUE`` and anything
after ``--``; unknown names, bad values and the options loramerge sets itself end with exit 2 and the fix."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from loramerge.cli.app import app
from loramerge.errors import OptionError
from loramerge.serving.vllm_engine import parse_engine_args


def test_engine_args_are_parsed_by_vllm():
    got = parse_engine_args(["gpu_memory_utilization=0.5", "enable_prefix_caching=false", "tensor-parallel-size=1"],
                            ["--max-num-seqs", "8", "--data-parallel-size", "1"])
    assert got == {"gpu_memory_utilization": 0.5, "enable_prefix_caching": False, "max_num_seqs": 8}


@pytest.mark.parametrize("items, forwarded, needle", [
    (["nonsense=1"], [], "no engine option '--nonsense'"),
    (["tensor_parallel_size=two"], [], "invalid int value"),
    (["max_lora_rank=8"], [], "use --max-lora-rank"),
    ([], ["--dtype", "float16"], "use --dtype"),
    (["enable_prefix_caching=maybe"], [], "is a switch"),
    (["novalue"], [], "KEY=VALUE"),
])
def test_bad_engine_args_are_refused(items, forwarded, needle):
    with pytest.raises(OptionError, match=needle):
        parse_engine_args(items, forwarded)


@pytest.mark.parametrize("extra, needle", [
    (["--engine-arg", "nonsense_option=1"], "no engine option"),
    (["--", "--max-num-seqs", "8", "--bogus-flag"], "no engine option '--bogus-flag'"),
])
def test_serve_refuses_bad_engine_options_before_starting(serving_base, extra, needle):
    result = CliRunner().invoke(app, ["serve", "--base", str(serving_base[1]), "--backend", "vllm", *extra])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and needle in output and "OptionError" in output, output
