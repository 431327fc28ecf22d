"""The examples in the model docstrings run and print what they show."""

import doctest

import pytest

import modeling_mico.modeling_mico
import modeling_mico.modeling_mico_text


@pytest.mark.parametrize(
    ("module", "minimum"), [(modeling_mico.modeling_mico, 5), (modeling_mico.modeling_mico_text, 1)]
)
def test_model_docstring_examples(module, minimum):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= minimum
    assert result.failed == 0
