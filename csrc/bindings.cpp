// The Python module protokern._C. It holds no functions: importing it loads the library, whose
// static initialisers register the kernels as torch ops (protokern_cpu::*, protokern_cuda::*),
// called through torch.ops. Plain CPython API, so no pybind11 compile time is spent here.
#include <Python.h>

static PyModuleDef protokern_c_module = {PyModuleDef_HEAD_INIT, "protokern._C",
                                         "protokern's compiled kernels (registered as torch ops)",
                                         -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&protokern_c_module); }
