"""Each expert's recipe (stage2.models.recipes) is what its command's flags and its constructor default to."""

import inspect

import pytest

from stage2.commands import train_effnet, train_genconvit
from stage2.experts.genconvit import GenConViTExpert
from stage2.experts.timm_classifier import TimmExpert
from stage2.models.names import GENCONVIT_INIT_MODES
from stage2.models.recipes import EFFNET, GENCONVIT

# The constructor's parameter names that differ from their flag's.
PARAM_FLAG = {"drop_path_rate": "drop_path", "head_input": "head"}


@pytest.mark.parametrize(("command", "expert", "recipe"), [(train_effnet, TimmExpert, EFFNET),
                                                           (train_genconvit, GenConViTExpert, GENCONVIT)])
def test_the_flags_and_the_constructor_default_to_the_recipe(command, expert, recipe):
    parser = command.build_parser()
    for flag, value in {**recipe.train, **recipe.model}.items():
        assert parser.get_default(flag) == value, flag
    params = inspect.signature(expert).parameters.items()
    defaults = {PARAM_FLAG.get(name, name): param.default for name, param in params
                if param.default is not inspect.Parameter.empty and param.default is not None}
    assert defaults, expert
    for flag, value in defaults.items():
        assert parser.get_default(flag) == value, flag


def test_the_defaults_that_follow_init_come_from_the_recipe():
    for init in GENCONVIT_INIT_MODES:
        args = train_genconvit.parse(["--init", init])
        for flag in ("lr", "warmup_epochs"):
            assert getattr(args, flag) == GENCONVIT.init_flags.get(init, GENCONVIT.train)[flag], (init, flag)
        expert = GenConViTExpert("ed", init=init, arch="official")
        wanted = GENCONVIT.init_model[init]
        assert (expert.stage_spec, expert.head_input, expert.ae_lr) == (wanted["stages"], wanted["head"],
                                                                        wanted["ae_lr"])
    help_text = train_genconvit.build_parser().format_help()
    assert "default to 3e-4 and 0.3" in help_text and "(default: 1e-3; with --init official, --lr)" in help_text
