//! Loads, pins, adopts, attaches and detaches the eBPF programs: the only module that
//! touches aya programs and links. What lives under the pin directory, and the types
//! every step shares, are in [`crate::pins`]; loading in [`crate::load`], replacing a
//! pinned datapath's programs in [`crate::upgrade`].

use std::path::Path;

use aya::programs::{
    SchedClassifier, TestRun as _, TestRunOptions,
    links::FdLink,
    tc::{self, TcAttachOptions},
};
use visibility_common::{clock::ClockSample, program_names};

use crate::{
    error::DatapathError,
    load::{load_verified, pin_programs},
    object::{self, Change, ObjectInfo},
};

#[cfg(feature = "bench-programs")]
pub use crate::ebpf_object::BENCH_EBPF_OBJECT;
use crate::pins::{create_private_dir, detach_pinned, program_error};
pub use crate::{
    ebpf_object::{EBPF_OBJECT, EbpfObject},
    pins::{
        AttachMode, DEFAULT_PIN_DIR, LoadOptions, Origin, PinDir, ProgramKind, attachments,
        ensure_bpffs, is_bpffs, remove_pins,
    },
};

/// The loaded (or adopted) programs.
pub struct Datapath {
    pins: PinDir,
    programs: Vec<(ProgramKind, SchedClassifier)>,
    mode: AttachMode,
    /// Samples the kernel's clocks (see [`crate::clock::sync_clock`]); `None` when adopting
    /// a datapath pinned before it existed, whose programs read the clock themselves.
    clock_sample: Option<SchedClassifier>,
    /// Forwards the programs' aya-log records. Kept alive for as long as the programs:
    /// dropping it closes the log map.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Datapath {
    /// Adopts the datapath pinned under `pin_dir`, or loads and pins a new one.
    pub fn open(pin_dir: &Path, options: &LoadOptions) -> Result<(Self, Origin), DatapathError> {
        let object = options.object.bytes();
        if object.is_empty() {
            return Err(DatapathError::NoObject);
        }
        if let EbpfObject::File { path, .. } = &options.object {
            tracing::info!(path = %path.display(), "the eBPF object is a file's (--ebpf-object), not this binary's own");
        }
        ensure_bpffs(pin_dir)?;
        let pins = PinDir::new(pin_dir);
        let ours = ObjectInfo::of(object);
        let origin = if pins.is_pinned() {
            let pinned = object::pinned(&pins);
            match Change::between(pinned, ours) {
                Change::None => Origin::Adopted,
                change => crate::upgrade::replace_pinned(&pins, options, change, pinned, ours)?,
            }
        } else {
            Self::load_and_pin(&pins, options)?;
            Origin::Loaded
        };
        // Last, so that a daemon that stopped half way through tries again.
        if origin != Origin::Adopted {
            object::set_pinned(&pins, ours)?;
        }
        let mut programs = Vec::new();
        for kind in ProgramKind::ALL {
            let program =
                SchedClassifier::from_pin(pins.program(kind)).map_err(program_error(kind))?;
            programs.push((kind, program));
        }
        // Adopted programs still write to the log map they were loaded with. Only the
        // programs that log reference it: the first of them that has it gives it.
        let logger = programs.iter().find_map(|(_, program)| {
            let info = program.info().ok()?;
            aya_log::EbpfLogger::init_from_id(info.id()).ok()
        });
        let datapath = Self {
            clock_sample: SchedClassifier::from_pin(pins.clock_sample_program()).ok(),
            pins,
            programs,
            mode: AttachMode::current(),
            logger,
        };
        Ok((datapath, origin))
    }

    /// Both of the kernel's clocks at one instant, from `clock_sample`.
    pub fn sample_clock(&self) -> Result<ClockSample, DatapathError> {
        let program = self
            .clock_sample
            .as_ref()
            .ok_or(DatapathError::ClockUnmeasurable)?;
        // An Ethernet frame's worth, of which the program overwrites the first 16 bytes.
        let frame = [0u8; 64];
        let mut out = [0u8; 64];
        program
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .map_err(|source| DatapathError::Program {
                program: program_names::CLOCK_SAMPLE,
                source: Box::new(source),
            })?;
        let word = |at: usize| u64::from_ne_bytes(out[at..at + 8].try_into().expect("eight bytes"));
        Ok(ClockSample {
            jiffies: word(0),
            coarse_ns: word(8),
        })
    }

    fn load_and_pin(pins: &PinDir, options: &LoadOptions) -> Result<(), DatapathError> {
        for dir in [
            pins.path().to_owned(),
            pins.maps(),
            pins.programs(),
            pins.links(),
        ] {
            create_private_dir(&dir)?;
        }
        let mut ebpf = load_verified(&pins.maps(), options)?;
        pin_programs(&mut ebpf, pins)
    }

    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// The program, for attaching or for `BPF_PROG_TEST_RUN`.
    pub fn program(&self, kind: ProgramKind) -> &SchedClassifier {
        &self
            .programs
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("all programs are opened")
            .1
    }

    fn program_mut(&mut self, kind: ProgramKind) -> &mut SchedClassifier {
        &mut self
            .programs
            .iter_mut()
            .find(|(k, _)| *k == kind)
            .expect("all programs are opened")
            .1
    }

    /// Forwards pending aya-log records to the `log` facade.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// Whether `kind` is attached to the interface, as far as the pins say.
    pub fn is_attached(&self, ifindex: u32, kind: ProgramKind) -> bool {
        self.pins.link(ifindex, kind).exists()
    }

    /// Attaches `kind` to the interface, unless it already is. Idempotent.
    pub fn attach(
        &mut self,
        ifname: &str,
        ifindex: u32,
        kind: ProgramKind,
    ) -> Result<(), DatapathError> {
        let link_pin = self.pins.link(ifindex, kind);
        if link_pin.exists() {
            return Ok(());
        }
        let mode = self.mode;
        let program = self.program_mut(kind);
        match mode {
            AttachMode::Tcx => {
                let id = program
                    .attach_with_options(
                        ifname,
                        kind.attach_type(),
                        TcAttachOptions::TcxOrder(Default::default()),
                    )
                    .map_err(program_error(kind))?;
                let link = program.take_link(id).map_err(program_error(kind))?;
                let link: FdLink =
                    link.try_into()
                        .map_err(|e: aya::programs::links::LinkError| DatapathError::Link {
                            path: link_pin.clone(),
                            source: Box::new(e),
                        })?;
                link.pin(&link_pin).map_err(|e| DatapathError::Link {
                    path: link_pin.clone(),
                    source: Box::new(e),
                })?;
            }
            AttachMode::Clsact => {
                if let Err(error) = tc::qdisc_add_clsact(ifname) {
                    // Already there is fine; anything else shows up in the attach below.
                    tracing::debug!(%ifname, %error, "adding clsact");
                }
                let id = program
                    .attach(ifname, kind.attach_type())
                    .map_err(program_error(kind))?;
                let link = program.take_link(id).map_err(program_error(kind))?;
                let place = crate::upgrade::FilterPlace::of(&link).map_err(program_error(kind))?;
                // A clsact filter outlives the daemon by itself; dropping the link would
                // detach it, so it is let go on purpose.
                std::mem::forget(link);
                // A bpffs directory marks the attachment, so restarts and `status` know
                // about it as they do for TCX links; the filter's place is in it.
                create_private_dir(&link_pin)?;
                create_private_dir(&link_pin.join(place.dir_name()))?;
            }
        }
        Ok(())
    }

    /// Detaches `kind` from the interface. Idempotent; a vanished interface is fine.
    pub fn detach(
        &mut self,
        ifname: Option<&str>,
        ifindex: u32,
        kind: ProgramKind,
    ) -> Result<(), DatapathError> {
        detach_pinned(&self.pins, self.mode, ifname, ifindex, kind)
    }

    /// The interfaces that have a pinned attachment, by ifindex.
    pub fn attachments(&self) -> Vec<(u32, ProgramKind)> {
        attachments(&self.pins)
    }
}
