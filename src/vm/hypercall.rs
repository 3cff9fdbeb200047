//! The vCPU run loop and the hypercalls it serves.
//!
//! Every hypercall argument is untrusted: buffers are checked with
//! [`check_user_range`] (memory the guest could access itself), lengths
//! against the VM's limits, and the copy of a host-call input happens under
//! the call's deadline.

use std::collections::HashMap;
use std::mem::offset_of;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

use super::abi_page::{bad, check_user_range, field, read_str, ARGS, RET};
use super::error::{GuestFault, PanicLocation, VmError};
use super::{
    timer, CallContext, CallData, Extension, HostCaller, Stop, TimeoutClock, Vm,
    MAX_PRESERVED_REGIONS,
};
use crate::abi::{self, AbiPage, Hypercall, PORT_FAULT, PORT_HYPERCALL};

/// Longest source file name in a panic location.
const MAX_FILE_NAME: u64 = 4096;

/// The name of the exported function at `index` (the call being served),
/// for log fields and host functions; `"(init)"` outside a call.
pub(super) fn current_function_name(functions: &HashMap<String, u64>, index: Option<u64>) -> &str {
    index
        .and_then(|index| functions.iter().find(|(_, &i)| i == index))
        .map_or("(init)", |(name, _)| name.as_str())
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Result<Duration, VmError> {
    crate::sys::clock::thread_cpu_time().map_err(VmError::Timer)
}

/// A call's deadline. The timer always runs on the monotonic clock: a
/// thread's CPU time never runs faster than wall-clock time, so for a
/// CPU-time limit the wall-clock deadline is the earliest the limit can be
/// reached, and it is pushed back by the CPU time still unused whenever it
/// passes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Deadline {
    pub(super) at: Instant,
    limit: Duration,
    clock: TimeoutClock,
    /// The thread's CPU time when the call started (CPU-time limits only).
    cpu_start: Duration,
}

impl Deadline {
    fn start(limit: Duration, clock: TimeoutClock) -> Result<Self, VmError> {
        let cpu_start = match clock {
            TimeoutClock::ThreadCpu => thread_cpu_time()?,
            _ => Duration::ZERO,
        };
        Ok(Self {
            at: Instant::now() + limit,
            limit,
            clock,
            cpu_start,
        })
    }

    /// Fails with [`VmError::Timeout`] if the limit is reached; otherwise
    /// the wall-clock time left until it could be.
    pub(super) fn check(&mut self) -> Result<Duration, VmError> {
        let now = Instant::now();
        if now < self.at {
            return Ok(self.at - now);
        }
        let timeout = VmError::Timeout {
            limit: self.limit,
            clock: self.clock,
        };
        match self.clock {
            TimeoutClock::ThreadCpu => {
                let used = thread_cpu_time()?.saturating_sub(self.cpu_start);
                let left = self.limit.saturating_sub(used);
                if left.is_zero() {
                    return Err(timeout);
                }
                self.at = now + left;
                Ok(left)
            }
            _ => Err(timeout),
        }
    }
}

/// A call the polling caller posted: what its bookkeeping needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PolledCall {
    pub(crate) seq: u64,
    pub(crate) index: u64,
    pub(crate) deadline: Option<Instant>,
}

/// What a polling run asks its owner (the vCPU thread).
pub(crate) trait PollHooks {
    /// The timer stopped the vCPU: park it or go on?
    fn watch(&mut self) -> Watch;
    /// The call posted last, if any.
    fn posted(&self) -> Option<PolledCall>;
    /// After each hypercall served: `Some(seq)` while polled call `seq`
    /// has a transaction open, `None` otherwise (the caller checks it when
    /// the call's result arrives, as the exit path checks it at `Done`).
    fn transaction_open(&self, seq: Option<u64>);
}

/// What a polling run's watcher decides when the timer stops the vCPU.
pub(crate) enum Watch {
    /// Stop the run: the VM is parked (see [`Stop::Parked`]).
    Park,
    /// Resume the guest and ask again after this long.
    Again(Duration),
}

impl<X: Extension, D> Vm<X, D> {
    /// Runs the vCPU until the guest reports Ready or Done, serving the
    /// hypercalls it makes on the way.
    pub(super) fn run(&mut self, call_data: CallData<'_>) -> Result<Stop, VmError> {
        self.dirty_fresh = false;
        let deadline = match self.timeout {
            Some(limit) => Some(Deadline::start(limit, self.timeout_clock)?),
            None => None,
        };
        // Disarmed on every way out, a panic unwinding through here included.
        let _armed = match deadline {
            Some(d) => Some(timer::Armed::new(d.limit).map_err(VmError::Timer)?),
            None => None,
        };
        // Dropped first: unregisters the thread, then the timer is disarmed.
        let _running = self.interrupt.enter()?;
        self.run_loop(deadline, call_data, None)
    }

    /// Runs the vCPU in polling mode: calls arrive through the ABI page
    /// while the guest runs, so there is no per-call deadline here (the
    /// caller enforces it through the interrupt handle). Every `check`
    /// (and then as `watch` says) the timer stops the vCPU and asks `watch`
    /// whether to go on; [`Watch::Park`] ends the run with [`Stop::Parked`].
    /// Ends with [`Stop::Idle`] (or [`Stop::Done`]) when the guest stops by
    /// itself.
    ///
    /// Calls arrive without an exit, so their bookkeeping
    /// ([`VmInstance::begin_call`](crate::vm::Vm::begin_call), the same as for calls through exits)
    /// runs at the first hypercall the guest makes in a call it has not
    /// seen yet: before that the guest has touched no host-side state.
    pub(crate) fn run_polling(
        &mut self,
        check: Duration,
        hooks: &mut dyn PollHooks,
    ) -> Result<Stop, VmError> {
        self.dirty_fresh = false;
        let _armed = timer::Armed::new(check).map_err(VmError::Timer)?;
        let _running = self.interrupt.enter()?;
        self.run_loop(None, None, Some(hooks))
    }

    /// Runs the bookkeeping of the call `hooks` posted last if this VM has
    /// not yet (see [`Self::run_polling`]).
    fn sync_polled_call(&mut self, hooks: &dyn PollHooks) {
        if let Some(call) = hooks.posted() {
            if call.seq != self.polled_seq {
                self.polled_seq = call.seq;
                self.begin_call(call.index, call.deadline);
            }
        }
    }

    fn run_loop(
        &mut self,
        mut deadline: Option<Deadline>,
        mut call_data: CallData<'_>,
        mut hooks: Option<&mut dyn PollHooks>,
    ) -> Result<Stop, VmError> {
        loop {
            self.check_memory()?;
            if self.interrupt.requested() {
                return Err(VmError::Cancelled);
            }
            self.exit_pending = true;
            let exit = self.machine.vcpu().run();
            // Memory that could not be filled poisons the VM before any exit
            // is served: the guest may have run on a stand-in page.
            if let Some(fault) = &self.memory_fault {
                fault.check()?;
            }
            let Some((port, value, size)) = io_exit(exit)? else {
                if self.interrupt.requested() {
                    return Err(VmError::Cancelled);
                }
                if let Some(hooks) = hooks.as_mut() {
                    match hooks.watch() {
                        Watch::Park => return Ok(Stop::Parked),
                        Watch::Again(after) => timer::arm(after).map_err(VmError::Timer)?,
                    }
                }
                if let Some(d) = deadline.as_mut() {
                    let before = d.at;
                    let left = d.check()?;
                    if d.at != before {
                        // A CPU-time limit not reached yet: wait for the rest.
                        timer::arm(left).map_err(VmError::Timer)?;
                    }
                }
                continue;
            };
            // A hypercall is one 32-bit `out`; anything else at the port (a
            // narrow write, string I/O of several elements) is refused.
            // Either way `exit_pending` stays set: on VT-x and AMD-V, RIP is
            // still *at* the `out` and KVM advances it only when it
            // completes the instruction on the next `KVM_RUN` (PVM advances
            // it before the exit). Every capture of the vCPU and every
            // rewind first completes it (`complete_pending_exit`), so a
            // snapshot never holds a hypercall that runs again.
            if port == PORT_HYPERCALL && size != 4 {
                return Err(VmError::UnexpectedExit {
                    exit: format!("{size}-byte write to the hypercall port"),
                });
            }
            if let Some(hooks) = hooks.as_mut() {
                self.sync_polled_call(&**hooks);
                // A guest that exits often (a host function in a loop) is
                // rarely inside KVM_RUN when the timer's signal arrives,
                // and a signal that lands in between is lost: ask at every
                // hypercall too, so an overrun is caught on time anyway.
                if matches!(hooks.watch(), Watch::Park) {
                    return Ok(Stop::Parked);
                }
            }
            match port {
                PORT_HYPERCALL => match Hypercall::from_u32(value) {
                    Some(Hypercall::Ready) => return Ok(Stop::Ready),
                    Some(Hypercall::Done) => return Ok(Stop::Done),
                    // Polling: the guest's window ended. Outside a polling
                    // run (a guest stopped mid-spin, then given a call the
                    // ordinary way) it resumes and serves the request.
                    Some(Hypercall::Idle) if hooks.is_some() => return Ok(Stop::Idle),
                    Some(Hypercall::Idle) => {}
                    Some(Hypercall::Log) => self.hypercall_log()?,
                    Some(Hypercall::HostCall) => {
                        self.hypercall_host_call(&mut deadline, call_data.as_deref_mut())?
                    }
                    Some(Hypercall::HostResult) => self.hypercall_host_result()?,
                    Some(Hypercall::Panic) => return Err(self.hypercall_panic()),
                    Some(Hypercall::Abort) => return Err(self.hypercall_abort()),
                    Some(Hypercall::Preserve) => self.hypercall_preserve()?,
                    Some(Hypercall::OutOfMemory) => {
                        let [requested] = self.read_words::<1>(ARGS)?;
                        let [heap_used] =
                            self.read_words::<1>(field(offset_of!(AbiPage, heap_used)))?;
                        return Err(VmError::GuestOutOfMemory {
                            requested,
                            heap_used,
                        });
                    }
                    Some(other) => {
                        // Not the core's: an extension's, or unknown.
                        let mut cx = CallContext {
                            ram: self.machine.ram(),
                            limits: &self.limits,
                            deadline: &mut deadline,
                            polled_deadline: self.call_deadline,
                            dirty: self.dirty_tracking.then_some(&mut self.dirty),
                            interrupt: &self.interrupt,
                            functions: &self.functions,
                            current_function: self.current_function,
                            program_digest: &self.program_digest,
                            origin: self.origin,
                            hypercall: super::ext::hypercall_name(other),
                            checkpoint: false,
                        };
                        match self.ext.hypercall(other, &mut cx) {
                            Some(served) => served?,
                            None => return Err(VmError::UnknownHypercall { nr: value }),
                        }
                        if cx.checkpoint && self.can_checkpoint() {
                            let checkpoint = self.checkpoint()?;
                            self.ext.checkpoint_taken(checkpoint);
                        }
                    }
                    None => return Err(VmError::UnknownHypercall { nr: value }),
                },
                PORT_FAULT => return Err(self.read_fault()),
                _ => {
                    return Err(VmError::UnexpectedExit {
                        exit: format!("write to I/O port {port:#x}"),
                    })
                }
            }
            if let Some(hooks) = hooks.as_deref() {
                hooks.transaction_open(self.ext.call_end().is_err().then_some(self.polled_seq));
            }
        }
    }

    /// Brings the vCPU out of any instruction it stopped in the middle of
    /// (the hypercall `out` itself on VT-x and AMD-V, a port read, string
    /// I/O, MMIO): KVM would otherwise complete it on the next `KVM_RUN`,
    /// *after* registers were captured or rewound, so a snapshot would hold
    /// RIP at a hypercall that runs again, and a rewind would resume the
    /// previous request's code. A `KVM_RUN` with `immediate_exit` set
    /// completes what is pending without entering the guest (KVM finishes
    /// pending I/O before it looks at `immediate_exit`). A no-op when the
    /// vCPU has run nothing since the last completion or restore.
    pub(crate) fn complete_pending_exit(&mut self) -> Result<(), VmError> {
        if !self.exit_pending {
            return Ok(());
        }
        /// KVM completes string I/O one batch (at most a page) per run:
        /// bound the rounds. A guest whose `rep ins` runs longer than this
        /// leaves a VM that cannot be rewound (`VcpuStuck`); drop it.
        const ROUNDS: usize = 4096;
        let vcpu = self.machine.vcpu();
        vcpu.set_kvm_immediate_exit(1);
        let mut last = String::new();
        let mut done = false;
        for _ in 0..ROUNDS {
            match vcpu.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    done = true;
                    break;
                }
                Err(source) => {
                    vcpu.set_kvm_immediate_exit(0);
                    return Err(VmError::Kvm {
                        step: "KVM_RUN (completing a pending exit)",
                        source,
                    });
                }
                Ok(VcpuExit::IoIn(_, data)) => {
                    data.fill(0);
                    last = "port read".into();
                }
                Ok(VcpuExit::MmioRead(_, data)) => {
                    data.fill(0);
                    last = "MMIO read".into();
                }
                Ok(other) => last = format!("{other:?}"),
            }
        }
        vcpu.set_kvm_immediate_exit(0);
        if !done {
            return Err(VmError::VcpuStuck { exit: last });
        }
        self.exit_pending = false;
        Ok(())
    }

    /// Accounts `len` log bytes against the call's budget; false when the
    /// message is to be dropped.
    fn log_allowed(&mut self, len: u64) -> bool {
        let budget = self.limits.log_budget;
        let before = self.log_used;
        self.log_used = before.saturating_add(len);
        if self.log_used <= budget {
            return true;
        }
        if before <= budget {
            log::warn!(
                target: "snapvm::guest",
                "guest log budget of {budget} bytes for this call is used up; \
                 its further messages are dropped"
            );
        }
        false
    }

    fn hypercall_log(&mut self) -> Result<(), VmError> {
        let [level, ptr, len] = self.read_words::<3>(ARGS)?;
        let ram = self.machine.ram();
        check_user_range(ram.size(), ptr, len).map_err(|e| bad("Log", e))?;
        let len = len.min(self.limits.message);
        let level = match level {
            1 => log::Level::Error,
            2 => log::Level::Warn,
            3 => log::Level::Info,
            4 => log::Level::Debug,
            _ => log::Level::Trace,
        };
        // Messages the logger drops use none of the call's budget.
        if !log::log_enabled!(target: "snapvm::guest", level) || !self.log_allowed(len) {
            return Ok(());
        }
        let text = read_str(self.machine.ram(), ptr, len, len, true).map_err(|e| bad("Log", e))?;
        log::log!(
            target: "snapvm::guest",
            level,
            function = current_function_name(&self.functions, self.current_function),
            generation:% = self.generation;
            "{text}"
        );
        Ok(())
    }

    /// Serves a host call. The function is looked up before any input is
    /// copied; input and result are bounded by the configured limits; the
    /// copy runs under the call's deadline, and only the host function
    /// itself runs with the timer off (so its system calls are not
    /// interrupted). A panic in the host function is caught here.
    fn hypercall_host_call(
        &mut self,
        deadline: &mut Option<Deadline>,
        call_data: CallData<'_>,
    ) -> Result<(), VmError> {
        let [name_ptr, name_len, in_ptr, in_len, out_ptr, out_cap] = self.read_words::<6>(ARGS)?;
        let size = self.memory_size();
        let name = read_str(
            self.machine.ram(),
            name_ptr,
            name_len,
            abi::MAX_FUNCTION_NAME,
            false,
        )
        .map_err(|e| bad("HostCall", e))?;
        check_user_range(size, in_ptr, in_len).map_err(|e| bad("HostCall", e))?;
        check_user_range(size, out_ptr, out_cap).map_err(|e| bad("HostCall", e))?;
        self.pending_host_result = None;
        let Some(f) = self.host_functions.get(&name).cloned() else {
            return self.write_words(RET, &[abi::HOST_CALL_UNKNOWN, 0]);
        };
        let (status, result) = if in_len > self.limits.host_call_input {
            let message = format!(
                "host call input of {in_len} bytes exceeds the {}-byte limit",
                self.limits.host_call_input
            );
            (abi::HOST_CALL_FAILED, message.into_bytes())
        } else if self.ext.defers_host_calls() && self.deferred.contains(&name) {
            let input = self
                .machine
                .ram()
                .read_vec(in_ptr, in_len)
                .map_err(|e| bad("HostCall", e.into()))?;
            self.ext
                .defer_host_call(name, input, self.limits.host_call_input)
        } else {
            let input = self
                .machine
                .ram()
                .read_vec(in_ptr, in_len)
                .map_err(|e| bad("HostCall", e.into()))?;
            // The input must not be a stand-in for memory that failed.
            self.check_memory()?;
            if deadline.is_some() {
                timer::disarm();
            }
            let mut caller = HostCaller {
                function: current_function_name(&self.functions, self.current_function),
                generation: self.generation,
                deadline: deadline.as_ref().map(|d| d.at).or(self.call_deadline),
                data: &mut self.data,
                call_data,
            };
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut caller, &input)));
            if self.interrupt.requested() {
                return Err(VmError::Cancelled);
            }
            if let Some(d) = deadline.as_mut() {
                let left = d.check()?;
                timer::arm(left).map_err(VmError::Timer)?;
            }
            match outcome {
                Ok(Ok(out)) if out.len() as u64 > self.limits.host_call_output => {
                    let message = format!(
                        "host function result of {} bytes exceeds the {}-byte limit",
                        out.len(),
                        self.limits.host_call_output
                    );
                    (abi::HOST_CALL_FAILED, message.into_bytes())
                }
                Ok(Ok(out)) => (abi::HOST_CALL_OK, out),
                Ok(Err(e)) => (abi::HOST_CALL_FAILED, e.to_string().into_bytes()),
                Err(payload) => {
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    return Err(VmError::HostFunctionPanic { name, message });
                }
            }
        };
        let len = result.len() as u64;
        if len <= out_cap {
            self.machine
                .ram()
                .write(out_ptr, &result)
                .map_err(|e| bad("HostCall", e.into()))?;
            self.note_host_write(out_ptr, len);
            self.write_words(RET, &[status, len])
        } else {
            // Keep the original status in the result so `HostResult` can
            // report success and failure alike.
            self.pending_host_result = Some(result);
            self.pending_status = status;
            self.write_words(RET, &[abi::HOST_CALL_TOO_SMALL, len])
        }
    }

    fn hypercall_preserve(&mut self) -> Result<(), VmError> {
        let [addr, len] = self.read_words::<2>(ARGS)?;
        let in_program_area = addr >= abi::USER_BASE
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.heap_end);
        let total = self
            .preserved
            .iter()
            .map(|&(_, l)| l)
            .fold(len, u64::saturating_add);
        let status = if !in_program_area || len == 0 {
            abi::PRESERVE_OUT_OF_RANGE
        } else if total > self.max_preserved || self.preserved.len() >= MAX_PRESERVED_REGIONS {
            abi::PRESERVE_TOO_LARGE
        } else {
            self.preserved.push((addr, len));
            abi::PRESERVE_OK
        };
        self.write_words(RET, &[status])
    }

    fn hypercall_host_result(&mut self) -> Result<(), VmError> {
        let [ptr, cap] = self.read_words::<2>(ARGS)?;
        check_user_range(self.memory_size(), ptr, cap).map_err(|e| bad("HostResult", e))?;
        let Some(result) = self.pending_host_result.take() else {
            return self.write_words(RET, &[abi::HOST_CALL_NO_RESULT, 0]);
        };
        let len = result.len() as u64;
        if len > cap {
            let status = abi::HOST_CALL_TOO_SMALL;
            self.pending_host_result = Some(result);
            return self.write_words(RET, &[status, len]);
        }
        self.machine
            .ram()
            .write(ptr, &result)
            .map_err(|e| bad("HostResult", e.into()))?;
        self.note_host_write(ptr, len);
        self.write_words(RET, &[self.pending_status, len])
    }

    /// A guest message (panic, abort), truncated to the configured limit.
    fn read_message(&self, hypercall: &'static str, ptr: u64, len: u64) -> Result<String, VmError> {
        check_user_range(self.memory_size(), ptr, len).map_err(|e| bad(hypercall, e))?;
        let len = len.min(self.limits.message);
        read_str(self.machine.ram(), ptr, len, len, true).map_err(|e| bad(hypercall, e))
    }

    fn hypercall_panic(&mut self) -> VmError {
        let result = (|| {
            let [msg_ptr, msg_len, file_ptr, file_len, line, column] =
                self.read_words::<6>(ARGS)?;
            let message = self.read_message("Panic", msg_ptr, msg_len)?;
            let location = if file_len == 0 {
                None
            } else {
                check_user_range(self.memory_size(), file_ptr, file_len)
                    .map_err(|e| bad("Panic", e))?;
                let file = read_str(self.machine.ram(), file_ptr, file_len, MAX_FILE_NAME, true)
                    .map_err(|e| bad("Panic", e))?;
                Some(PanicLocation {
                    file,
                    line: line as u32,
                    column: column as u32,
                })
            };
            Ok(VmError::GuestPanic { message, location })
        })();
        result.unwrap_or_else(|e| e)
    }

    fn hypercall_abort(&mut self) -> VmError {
        let result = (|| {
            let [ptr, len] = self.read_words::<2>(ARGS)?;
            let message = self.read_message("Abort", ptr, len)?;
            Ok(VmError::GuestAbort { message })
        })();
        result.unwrap_or_else(|e| e)
    }

    /// Reads the exception frame the CPL0 stub left on its stack.
    fn read_fault(&mut self) -> VmError {
        let regs = match self.machine.vcpu().get_regs() {
            Ok(regs) => regs,
            Err(source) => {
                return VmError::Kvm {
                    step: "KVM_GET_REGS",
                    source,
                }
            }
        };
        let sregs = match self.machine.vcpu().get_sregs() {
            Ok(sregs) => sregs,
            Err(source) => {
                return VmError::Kvm {
                    step: "KVM_GET_SREGS",
                    source,
                }
            }
        };
        // Frame: vector, error code, then what the CPU pushed (RIP, CS, ...).
        let mut frame = [0u8; 24];
        if self.machine.ram().read(regs.rsp, &mut frame).is_err()
            || !(abi::SYSTEM_AREA_START..abi::SYSTEM_AREA_END).contains(&regs.rsp)
        {
            return VmError::UnexpectedExit {
                exit: format!("fault exit with stack pointer {:#x}", regs.rsp),
            };
        }
        let word =
            |i: usize| u64::from_le_bytes(frame[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let vector = word(0) as u8;
        VmError::GuestFault(GuestFault {
            vector,
            error_code: word(1),
            rip: word(2),
            addr: (vector == 14).then_some(sregs.cr2),
        })
    }
}

/// Classifies the result of one `KVM_RUN`: an I/O write gives its port,
/// value (the first four bytes) and size in bytes (element size × count),
/// an interrupted run (the timeout signal) gives `None`, and every other
/// exit is an error.
pub(crate) fn io_exit(
    run: Result<VcpuExit<'_>, kvm_ioctls::Error>,
) -> Result<Option<(u16, u32, usize)>, VmError> {
    match run {
        Ok(VcpuExit::IoOut(port, data)) => {
            let mut word = [0u8; 4];
            let n = data.len().min(4);
            word[..n].copy_from_slice(&data[..n]);
            Ok(Some((port, u32::from_le_bytes(word), data.len())))
        }
        Ok(VcpuExit::Shutdown) => Err(VmError::Shutdown),
        Ok(VcpuExit::IoIn(port, _)) => Err(VmError::UnexpectedExit {
            exit: format!("read from I/O port {port:#x}"),
        }),
        Ok(other) => Err(VmError::UnexpectedExit {
            exit: format!("{other:?}"),
        }),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(None),
        Err(source) => Err(VmError::Kvm {
            step: "KVM_RUN",
            source,
        }),
    }
}
