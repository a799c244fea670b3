// The sampler's fused ops (issue 22).
#include "shared_ops.h"

void bind_sampler_ops(pybind11::module& m) {}
