"""The examples in the model docstrings run and print what they show."""

import doctest

import modeling_mico.modeling_mico


def test_model_docstring_examples():
    result = doctest.testmod(modeling_mico.modeling_mico, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3
    assert result.failed == 0
