// The Python module `ema_cuda._C`, and why it exists beside the ops.
//
// Importing it loads this library, which registers the ops (schema.cpp, the
// backends, testing.cpp).  What it adds is what cannot be an op:
//
// * `ListUpdater`, FusedUpdater's C++ side: an object that holds both tensor
//   lists and their plan, so that a per-step update passes no list through
//   the dispatcher (about 0.13 us per tensor: 2.7 ms for two lists of
//   10,000).  An op's arguments live for one call; this lives for many.
// * `watched_entries_unchanged`, ModelEMA's per-step check that its module
//   trees still hold what its plan was built from.  It reads Python dicts,
//   which no op schema can take.
// * `update_listed` and its overloads: the ops called with lists from
//   ema_cuda.ops, without torch.ops' per-tensor conversion (NOTE [listed
//   calls]).
// * `cuda_compiled`, asked once at import (ema_cuda.ops.cuda_kernel_available).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include "checks.h"
#include "cpu/ema_update_cpu.h"
#include "cuda/ema_update_cuda.h"
#include "plan.h"

namespace ema_cuda {
namespace {

class ListUpdater {
 public:
  // Averages model[i] into ema[i] and copies copy_model[j] into copy_ema[j],
  // all in one launch.
  ListUpdater(std::vector<at::Tensor> ema, std::vector<at::Tensor> model,
              std::vector<at::Tensor> copy_ema, std::vector<at::Tensor> copy_model)
      : ListUpdater(std::move(ema), std::move(model), std::move(copy_ema),
                    std::move(copy_model), 1, false) {}

  void update(double decay) {
    check_decay(name_, decay);
    run(ensure_plan(), make_decay_arg(decay, nullptr), &decay);
  }

  void update_tensor(const at::Tensor& decay) {
    check_decay_tensor(name_, decay, ema_.empty() ? copy_ema_ : ema_);
    double value = 0.0;
    if (!decay.is_cuda()) {
      value = decay.item<double>();
      check_decay(name_, value);
    }
    run(ensure_plan(), make_decay_arg(value, decay.is_cuda() ? &decay : nullptr), &value);
  }

  // True when an update would run now: the held plan is valid, or a plan for
  // the lists as they are now validates (it is then held).  False, with
  // nothing written and the held plan kept, when the lists can no longer be
  // updated (a tensor moved to another device, shape or layout): the caller
  // rebuilds its lists instead of catching the update's error.
  bool ready() {
    const UpdateLists l = lists();
    if (plan_->matches(l, chunk_size_for(l.device()))) return true;
    try {
      refresh();
    } catch (const c10::Error&) {
      return false;
    }
    return true;
  }

  int64_t num_tensors() const { return static_cast<int64_t>(ema_.size()); }
  int64_t num_copies() const { return static_cast<int64_t>(copy_ema_.size()); }
  int64_t num_elements() const { return plan_->num_elements; }
  int64_t num_chunks() const { return plan_->num_chunks; }
  int64_t rebuilds() const { return rebuilds_; }

 protected:
  ListUpdater(std::vector<at::Tensor> ema, std::vector<at::Tensor> model,
              std::vector<at::Tensor> copy_ema, std::vector<at::Tensor> copy_model,
              int64_t profiles, bool multi)
      : ema_(std::move(ema)),
        model_(std::move(model)),
        copy_ema_(std::move(copy_ema)),
        copy_model_(std::move(copy_model)),
        profiles_(profiles),
        multi_(multi),
        name_(multi ? kMultiUpdaterName : kUpdaterName) {
    refresh();
  }

  // The tensors are held here, so their storages stay alive; but a tensor's
  // storage, size or layout can still change (`p.data = ...`, `set_`,
  // `resize_`, `module.to()` on a parameter).  Each call checks the held plan
  // (NOTE [plan validity]); a change means a full re-validation before
  // anything is written.
  UpdateLists lists() const { return {ema_, model_, copy_ema_, copy_model_, profiles_, multi_}; }

  // The plan to run: the held one while it is valid (NOTE [plan validity]),
  // else a fully re-validated one.  Returned by value: another Python thread
  // may replace plan_ while this one runs without the GIL, and the copy keeps
  // the running plan's table alive.
  PlanPtr ensure_plan() {
    const UpdateLists l = lists();
    if (!plan_->matches(l, chunk_size_for(l.device()))) refresh();
    return plan_;
  }

  // `get_plan` validates the lists unless a valid plan is cached for them.
  void refresh() {
    const UpdateLists l = lists();
    plan_ = get_plan(name_, l, chunk_size_for(l.device()));
    ++rebuilds_;
  }

  // `arg` for the CUDA kernel, `host` (the checked values) for the CPU one.
  void run(PlanPtr plan, const DecayArg& arg, const double* host) {
    pybind11::gil_scoped_release no_gil;
    if (plan->device.is_cuda()) {
      cuda_launch(plan, arg);
    } else {
      cpu_multi_update(*plan, host);
    }
  }

  std::vector<at::Tensor> ema_, model_, copy_ema_, copy_model_;
  const int64_t profiles_;
  const bool multi_;
  const char* const name_;
  PlanPtr plan_;
  int64_t rebuilds_ = -1;  // the constructor's build is not a rebuild
};

// MultiFusedUpdater's C++ side: `profiles` EMAs of one model's tensors
// (ema profile-major, NOTE [several EMAs]), all in one launch.
class MultiListUpdater : public ListUpdater {
 public:
  MultiListUpdater(std::vector<at::Tensor> ema, std::vector<at::Tensor> model, int64_t profiles)
      : ListUpdater(std::move(ema), std::move(model), {}, {}, checked_profiles(profiles), true) {}

  void update_decays(const std::vector<double>& decays) {
    check_decays(name_, decays, profiles_);
    run(ensure_plan(), make_decays_arg(decays, nullptr), decays.data());
  }

  void update_decays_tensor(const at::Tensor& decays) {
    check_decays_tensor(name_, decays, ema_, profiles_);
    std::vector<double> host;
    if (!decays.is_cuda()) host = read_decays(name_, decays);
    run(ensure_plan(), make_decays_arg(host, decays.is_cuda() ? &decays : nullptr), host.data());
  }

  int64_t profiles() const { return profiles_; }

 private:
  static int64_t checked_profiles(int64_t profiles) {
    TORCH_CHECK(profiles >= 1 && profiles <= kMaxProfiles, kMultiUpdaterName, ": got ", profiles,
                " EMA profiles; one multi-EMA update takes 1 to ", kMaxProfiles, " profiles");
    return profiles;
  }
};

// NOTE [listed calls]
// ema_cuda.ops.ema_update_ and multi_ema_update_ hand their lists to these
// functions instead of torch.ops.  torch.ops turns each element of a list
// into an IValue and the boxed call turns them back into a vector of
// tensors: about 0.1 us per tensor, 2 ms of a 10,000-pair update whose
// arithmetic on 1,000 fp32 elements a pair takes 3 to 4 ms.  Here each
// element is read from the Python list in place (a type check and a
// reference count) and the op is called through the dispatcher, typed and
// unboxed: the same kernels and checks, the same profiler events, Python
// dispatch modes (fake tensors) and autograd fallthrough as torch.ops.
// What torch.ops also does is `__torch_function__`: an element or decay
// tensor that is not exactly a torch.Tensor or nn.Parameter makes these
// return false with nothing done, and the caller goes through torch.ops
// (as it does under torch.compile and inside a torch function mode).
namespace listed {

bool unpack(const pybind11::list& list, std::vector<at::Tensor>& out) {
  const Py_ssize_t n = PyList_GET_SIZE(list.ptr());
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(list.ptr(), i);  // borrowed
    if (!THPVariable_CheckExact(item)) return false;
    out.push_back(THPVariable_Unpack(item));
  }
  return true;
}

const at::Tensor* plain_tensor(const pybind11::handle& obj) {
  return THPVariable_CheckExact(obj.ptr()) ? &THPVariable_Unpack(obj.ptr()) : nullptr;
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<Signature>();
}

// Runs `call(ema, model)` without the GIL when both lists hold plain tensors.
template <typename Call>
bool with_lists(const pybind11::list& ema, const pybind11::list& model, Call&& call) {
  std::vector<at::Tensor> e, m;
  if (!unpack(ema, e) || !unpack(model, m)) return false;
  pybind11::gil_scoped_release no_gil;
  call(e, m);
  return true;
}

using DecayTensorOp = c10::TypedOperatorHandle<void(at::TensorList, at::TensorList, const at::Tensor&)>;

// A Tensor overload, with a decay tensor that must be plain too.
bool with_decay_tensor(const DecayTensorOp& handle, const pybind11::list& ema, const pybind11::list& model,
                       const pybind11::handle& decay) {
  const at::Tensor* d = plain_tensor(decay);
  return d != nullptr &&
         with_lists(ema, model, [&](at::TensorList e, at::TensorList m) { handle.call(e, m, *d); });
}

bool update(const pybind11::list& ema, const pybind11::list& model, double decay) {
  static const auto handle = op<void(at::TensorList, at::TensorList, double)>(kOpName, "");
  return with_lists(ema, model, [&](at::TensorList e, at::TensorList m) { handle.call(e, m, decay); });
}

bool update_tensor(const pybind11::list& ema, const pybind11::list& model, const pybind11::handle& decay) {
  static const DecayTensorOp handle =
      op<void(at::TensorList, at::TensorList, const at::Tensor&)>(kOpName, "Tensor");
  return with_decay_tensor(handle, ema, model, decay);
}

bool multi_update(const pybind11::list& ema, const pybind11::list& model, const std::vector<double>& decays) {
  static const auto handle =
      op<void(at::TensorList, at::TensorList, at::ArrayRef<double>)>(kMultiOpName, "");
  return with_lists(ema, model, [&](at::TensorList e, at::TensorList m) { handle.call(e, m, decays); });
}

bool multi_update_tensor(const pybind11::list& ema, const pybind11::list& model,
                         const pybind11::handle& decays) {
  static const DecayTensorOp handle =
      op<void(at::TensorList, at::TensorList, const at::Tensor&)>(kMultiOpName, "Tensor");
  return with_decay_tensor(handle, ema, model, decays);
}

}  // namespace listed

// ModelEMA's per-step check that its cached plan still describes both module
// trees (ema_cuda/ema/plan.py, `TreeWatch.unchanged`, through
// ema_cuda.ops.entries_unchanged, whose fallback runs the same test in
// Python): owners[i].get(keys[i]) is objects[i] for every i, and
// len(registries[j]) == sizes[j] for every j.  Owners and registries must be
// dicts (module._parameters, ._buffers, ._modules).  Runs with the GIL held:
// it only reads Python objects, about 10 ns per entry.
bool watched_entries_unchanged(const pybind11::tuple& owners, const pybind11::tuple& keys,
                               const pybind11::tuple& objects, const pybind11::tuple& registries,
                               const pybind11::tuple& sizes) {
  const Py_ssize_t n = PyTuple_GET_SIZE(objects.ptr());
  if (PyTuple_GET_SIZE(owners.ptr()) != n || PyTuple_GET_SIZE(keys.ptr()) != n ||
      PyTuple_GET_SIZE(registries.ptr()) != PyTuple_GET_SIZE(sizes.ptr())) {
    throw pybind11::value_error("watched_entries_unchanged: tuples of different lengths");
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* owner = PyTuple_GET_ITEM(owners.ptr(), i);
    if (!PyDict_Check(owner)) throw pybind11::type_error("watched_entries_unchanged: an owner is not a dict");
    PyObject* value = PyDict_GetItemWithError(owner, PyTuple_GET_ITEM(keys.ptr(), i));  // borrowed
    if (value == nullptr && PyErr_Occurred()) throw pybind11::error_already_set();
    if (value != PyTuple_GET_ITEM(objects.ptr(), i)) return false;
  }
  for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(registries.ptr()); ++j) {
    PyObject* registry = PyTuple_GET_ITEM(registries.ptr(), j);
    if (!PyDict_Check(registry)) throw pybind11::type_error("watched_entries_unchanged: a registry is not a dict");
    const Py_ssize_t size = PyLong_AsSsize_t(PyTuple_GET_ITEM(sizes.ptr(), j));
    if (size == -1 && PyErr_Occurred()) throw pybind11::error_already_set();
    if (PyDict_GET_SIZE(registry) != size) return false;
  }
  return true;
}

}  // namespace
}  // namespace ema_cuda

PYBIND11_MODULE(_C, m) {
  using ema_cuda::ListUpdater;
  m.doc() = "Compiled kernels of ema_cuda (ops are under torch.ops.ema_cuda).";
  m.def("cuda_compiled", &ema_cuda::cuda_compiled,
        "True when this build contains the CUDA kernel.");
  m.def("watched_entries_unchanged", &ema_cuda::watched_entries_unchanged, pybind11::arg("owners"),
        pybind11::arg("keys"), pybind11::arg("objects"), pybind11::arg("registries"), pybind11::arg("sizes"),
        "ModelEMA's per-step plan check: owners[i].get(keys[i]) is objects[i] for all i and "
        "len(registries[j]) == sizes[j] for all j.");
  // NOTE [listed calls]: true when the op ran, false (nothing done) when
  // ema_cuda.ops must go through torch.ops instead.
  m.def("update_listed", &ema_cuda::listed::update, pybind11::arg("ema"), pybind11::arg("model"),
        pybind11::arg("decay"));
  m.def("update_listed_tensor", &ema_cuda::listed::update_tensor, pybind11::arg("ema"),
        pybind11::arg("model"), pybind11::arg("decay"));
  m.def("multi_update_listed", &ema_cuda::listed::multi_update, pybind11::arg("ema"),
        pybind11::arg("model"), pybind11::arg("decays"));
  m.def("multi_update_listed_tensor", &ema_cuda::listed::multi_update_tensor, pybind11::arg("ema"),
        pybind11::arg("model"), pybind11::arg("decays"));
  pybind11::class_<ListUpdater>(m, "ListUpdater")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>>(),
           pybind11::arg("ema"), pybind11::arg("model"), pybind11::arg("copy_ema") = std::vector<at::Tensor>{},
           pybind11::arg("copy_model") = std::vector<at::Tensor>{})
      .def("update", &ListUpdater::update, pybind11::arg("decay"))
      .def("update_tensor", &ListUpdater::update_tensor, pybind11::arg("decay"))
      .def("ready", &ListUpdater::ready)
      .def_property_readonly("num_tensors", &ListUpdater::num_tensors)
      .def_property_readonly("num_copies", &ListUpdater::num_copies)
      .def_property_readonly("num_elements", &ListUpdater::num_elements)
      .def_property_readonly("num_chunks", &ListUpdater::num_chunks)
      .def_property_readonly("rebuilds", &ListUpdater::rebuilds);
  pybind11::class_<ema_cuda::MultiListUpdater>(m, "MultiListUpdater")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t>(),
           pybind11::arg("ema"), pybind11::arg("model"), pybind11::arg("profiles"))
      .def("update", &ema_cuda::MultiListUpdater::update_decays, pybind11::arg("decays"))
      .def("update_tensor", &ema_cuda::MultiListUpdater::update_decays_tensor, pybind11::arg("decays"))
      .def("ready", &ema_cuda::MultiListUpdater::ready)
      .def_property_readonly("profiles", &ema_cuda::MultiListUpdater::profiles)
      .def_property_readonly("num_tensors", &ema_cuda::MultiListUpdater::num_tensors)
      .def_property_readonly("num_elements", &ema_cuda::MultiListUpdater::num_elements)
      .def_property_readonly("num_chunks", &ema_cuda::MultiListUpdater::num_chunks)
      .def_property_readonly("rebuilds", &ema_cuda::MultiListUpdater::rebuilds);
}
