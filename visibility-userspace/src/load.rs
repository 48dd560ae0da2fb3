//! Loads the eBPF object: in the fastest variant the kernel's verifier takes
//! ([`crate::variant`]), its maps pinned by name (or taken up where they already are),
//! then its programs pinned. [`crate::datapath`] loads a new datapath with it, and
//! [`crate::upgrade`] another object's replacement.

use std::{fs, path::Path};

use aya::{Ebpf, EbpfLoader, programs::SchedClassifier, util::KernelVersion};
use visibility_common::{global_names, map_names, program_names};

use crate::{
    error::DatapathError,
    pins::{LoadOptions, PinDir, ProgramKind, io_error},
    variant::Variant,
};

/// Loads a program, retrying when the verifier gave up with `EAGAIN` because a signal
/// was pending for the loading thread (as libbpf does, up to five times).
fn load_retrying(program: &mut SchedClassifier) -> Result<(), aya::programs::ProgramError> {
    let mut attempts = 0;
    loop {
        match program.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts < 5 =>
            {
                attempts += 1;
            }
            result => return result,
        }
    }
}

/// Whether `error` is the verifier's refusal of a program (too many instructions, or a
/// path it cannot prove safe), which a simpler variant may pass; not a missing
/// permission or a failed map.
fn is_verifier_refusal(error: &DatapathError) -> bool {
    matches!(
        error,
        DatapathError::Program { source, .. }
            if matches!(
                source.as_ref(),
                aya::programs::ProgramError::LoadError { io_error, .. }
                    if matches!(io_error.raw_os_error(), Some(libc::E2BIG | libc::EACCES | libc::EINVAL))
            )
    )
}

/// The object with its programs loaded (verified), in the fastest variant the kernel's
/// verifier takes, not yet pinned. Its maps are pinned by name under `maps_dir`, or
/// taken up from there when they already are.
pub(crate) fn load_verified(maps_dir: &Path, options: &LoadOptions) -> Result<Ebpf, DatapathError> {
    let mut variant = Variant::for_kernel(KernelVersion::current().ok());
    let ebpf = loop {
        match load_programs(maps_dir, options, variant) {
            Ok(ebpf) => break ebpf,
            Err(error) => match variant.fallback() {
                Some(next) if is_verifier_refusal(&error) => {
                    tracing::warn!(
                        %variant,
                        %next,
                        %error,
                        "the kernel's verifier refused this build of the datapath; loading a simpler one"
                    );
                    variant = next;
                }
                _ => return Err(error),
            },
        }
    };
    tracing::info!(%variant, "datapath loaded");
    Ok(ebpf)
}

/// Pins the object's programs under `pins`, in place of any pinned before.
pub(crate) fn pin_programs(ebpf: &mut Ebpf, pins: &PinDir) -> Result<(), DatapathError> {
    let programs = ProgramKind::ALL
        .map(|kind| (kind.name(), pins.program(kind)))
        .into_iter()
        .chain([(program_names::CLOCK_SAMPLE, pins.clock_sample_program())]);
    for (name, path) in programs {
        let program = classifier(ebpf, name).map_err(|source| DatapathError::Program {
            program: name,
            source: Box::new(source),
        })?;
        // The pinned one, if any, is unloaded once no link uses it either.
        if path.exists() {
            fs::remove_file(&path).map_err(io_error("unpinning", &path))?;
        }
        program.pin(&path).map_err(|source| DatapathError::Link {
            path,
            source: Box::new(source),
        })?;
    }
    Ok(())
}

/// The object with `variant`'s constants, and its programs loaded (verified), not yet
/// pinned. Its maps are pinned by name as they are created, and the next attempt after
/// a refusal takes them up again.
fn load_programs(
    maps_dir: &Path,
    options: &LoadOptions,
    variant: Variant,
) -> Result<Ebpf, DatapathError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .map_max_entries(map_names::FLOWS, options.flow_capacity)
        .override_global(
            global_names::JUDGE_EVERY_PACKET,
            &variant.judge_every_packet(),
            true,
        )
        .override_global(
            global_names::WALK_PACKET_KINDS_AS_ONE,
            &variant.walk_packet_kinds_as_one(),
            true,
        )
        .load(options.object.bytes())
        .map_err(|e| DatapathError::Load(Box::new(e)))?;
    let names = ProgramKind::ALL
        .map(ProgramKind::name)
        .into_iter()
        .chain([program_names::CLOCK_SAMPLE]);
    for name in names {
        let error = |source| DatapathError::Program {
            program: name,
            source: Box::new(source),
        };
        load_retrying(classifier(&mut ebpf, name).map_err(error)?).map_err(error)?;
    }
    Ok(ebpf)
}

/// The object's classifier program `name`.
pub(crate) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, aya::programs::ProgramError> {
    ebpf.program_mut(name)
        .ok_or(aya::programs::ProgramError::NotLoaded)?
        .try_into()
}
