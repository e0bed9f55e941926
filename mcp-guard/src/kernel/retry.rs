//! A program load the kernel interrupted. BPF_PROG_LOAD answers EAGAIN when a signal
//! arrives while the verifier runs (a `systemctl reload` while the daemon starts): the
//! program is fine, the load is tried again (libbpf does the same), a few times.

use aya::programs::ProgramError;

/// Tries in all, the first included.
const ATTEMPTS: usize = 5;

/// An error that may be the verifier interrupted by a signal.
pub trait Interrupted {
    fn interrupted(&self) -> bool;
}

impl Interrupted for std::io::Error {
    fn interrupted(&self) -> bool {
        self.raw_os_error() == Some(libc::EAGAIN)
    }
}

impl Interrupted for ProgramError {
    fn interrupted(&self) -> bool {
        matches!(self, ProgramError::LoadError { io_error, .. } if io_error.interrupted())
    }
}

/// Runs `load` until it succeeds, fails for another reason, or was interrupted
/// [`ATTEMPTS`] times.
pub fn load<T, E: Interrupted>(mut load: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let mut left = ATTEMPTS;
    loop {
        match load() {
            Err(e) if e.interrupted() && left > 1 => left -= 1,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_loads_are_tried_again_a_few_times_and_other_errors_never() {
        let eagain = || std::io::Error::from_raw_os_error(libc::EAGAIN);
        let mut calls = 0;
        let r = load(|| {
            calls += 1;
            if calls < 3 {
                Err(eagain())
            } else {
                Ok(7)
            }
        });
        assert_eq!((r.unwrap(), calls), (7, 3));
        calls = 0;
        let r: Result<(), _> = load(|| {
            calls += 1;
            Err(eagain())
        });
        assert!(r.unwrap_err().interrupted());
        assert_eq!(calls, ATTEMPTS);
        calls = 0;
        let r: Result<(), _> = load(|| {
            calls += 1;
            Err(std::io::Error::from_raw_os_error(libc::EPERM))
        });
        assert_eq!(
            (r.unwrap_err().raw_os_error(), calls),
            (Some(libc::EPERM), 1)
        );
    }
}
