"""The absl flags of ExperimentConfig's fields, made from the fields themselves.

A field's type picks the kind of flag, its choices make an enum, and its help
text gets the default added. A field whose default depends on the dataset has
a flag that defaults to None, so that config.resolve fills in the paper's
value for the dataset given, and a help text that lists those values.
"""

from absl import flags

from tf_mamlpp.run import config

# The flags belong to the module that calls define_config_flags (main.py):
# --help lists them as its own.
flags.disclaim_key_flags()

DEFINE_BY_TYPE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float, str: flags.DEFINE_string}


def define_config_flags(flag_values=flags.FLAGS):
    """Defines a flag for each of config.command_line_fields(), named as the field."""
    for field in config.command_line_fields():
        default = None if field.metadata["per_dataset"] is not None else field.default
        kind, choices = config.value_type(field), field.metadata["constraint"]
        if kind is str and isinstance(choices, tuple):
            flags.DEFINE_enum(field.name, default, choices, flag_help(field),
                              flag_values=flag_values)
        elif kind is bool and config.AUTO in (choices or ()):
            flags.DEFINE_flag(flags.Flag(BooleanOrAutoParser(), flags.ArgumentSerializer(),
                                         field.name, default, flag_help(field), boolean=True),
                              flag_values=flag_values)
        else:
            DEFINE_BY_TYPE[kind](field.name, default, flag_help(field), flag_values=flag_values)


class BooleanOrAutoParser(flags.ArgumentParser):
    """A bool flag that also takes `auto`: --name, --noname, --name=true|false|auto."""

    def parse(self, argument):
        if isinstance(argument, str) and argument.lower() == config.AUTO:
            return config.AUTO
        try:
            return flags.BooleanParser().parse(argument)
        except (TypeError, ValueError):
            raise ValueError(f"must be true, false or {config.AUTO}") from None

    def flag_type(self):
        return f"bool or {config.AUTO}"


def config_values(flag_values=flags.FLAGS):
    """Field name -> the flag's value (None where a per-dataset default applies)."""
    return {field.name: flag_values[field.name].value for field in config.command_line_fields()}


def flag_help(field):
    """The field's help text with its default: its value, or its value on each dataset."""
    per_dataset = field.metadata["per_dataset"]
    if per_dataset is not None:
        return f"{field.metadata['help']} Default: {_per_dataset_text(per_dataset)}."
    if field.default is None:
        return field.metadata["help"]
    return f"{field.metadata['help']} Default {_shown(field.default)}."


def _per_dataset_text(per_dataset):
    """"28 on omniglot, 84 on mini_imagenet and folder"; datasets with no value are left out."""
    datasets_by_value = {}
    for dataset, value in per_dataset.items():
        if value is not None:
            datasets_by_value.setdefault(value, []).append(dataset)
    if list(datasets_by_value.values()) == [list(config.DATASETS)]:
        return f"{_shown(next(iter(datasets_by_value)))} on every dataset"
    return ", ".join(f"{_shown(value)} on {_listed(datasets)}"
                     for value, datasets in datasets_by_value.items())


def _listed(names):
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _shown(value):
    """A default as a user writes it: true, 0.001, datasets/omniglot."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value.removeprefix(config.REPOSITORY + "/")  # shipped data, wherever installed
    return str(value)
