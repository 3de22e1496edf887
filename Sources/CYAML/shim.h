// libyaml (libyaml-dev): the event parser behind the --config file.
#include <yaml.h>
