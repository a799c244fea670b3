// The decoder layer's fused ops besides RMSNorm and decode attention (issue 22).
#include "shared_ops.h"

void bind_layer_ops(pybind11::module& m) {}
