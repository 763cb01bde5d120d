// cuDNN's float32 setting for the whole process (src/runtime.rs,
// `runtime::float32_convolutions`): libtorch runs float32 cuDNN convolutions in
// TF32 unless told otherwise. This is what `torch.backends.cudnn.allow_tf32 = False`
// does in Python.
#include <ATen/Context.h>

extern "C" {

void mos_cudnn_set_allow_tf32(int allow) {
    at::globalContext().setAllowTF32CuDNN(allow != 0);
}

int mos_cudnn_allow_tf32() {
    return at::globalContext().allowTF32CuDNN() ? 1 : 0;
}

} // extern "C"
