//! The instruction set the kernels run on, chosen once per process and carried as a type.
//!
//! [`Avx2`], [`Avx512`] (x86-64) and `Neon` (ARM64, compiled there only) are tokens: values that
//! only their `detect` functions can make, and only on a CPU that has the features. A kernel that
//! needs a feature takes its token, so a safe function can call its `#[target_feature]` code
//! without trusting a flag from its caller (as the `gemm` crate's `simd` tokens and
//! `matrixmultiply`'s one-type-per-ISA kernels). [`Isa::get`] runs the choice once ([`OnceLock`])
//! and hands out the set; tests and benches may pass a narrower one from [`Isa::available`].
//!
//! The choice is the widest set of this CPU, unless the environment variable
//! [`ISA_ENV`] (`BAYESLORA_ISA`) names one: `avx512`, `avx2`, `neon` or `portable` (`auto` or
//! unset: the widest), so one machine can run every path of one build. A set the CPU lacks, or an unknown
//! name, is never replaced by another: [`Isa::selected`] returns an [`IsaError`], which the
//! entry points that run kernels ([`crate::encoder::Encoder::new`],
//! [`crate::kernels::fma_peak_gflops`]) report before any kernel runs.

use std::sync::OnceLock;

/// Proof that this CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Avx2 {
    _detected: (),
}

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// The token, if this CPU has AVX2 and FMA.
    pub fn detect() -> Option<Self> {
        (std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
            .then_some(Self { _detected: () })
    }
}

/// Proof that this CPU has AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Avx512 {
    avx2: Avx2,
}

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    /// The token, if this CPU has AVX-512F, AVX2 and FMA.
    pub fn detect() -> Option<Self> {
        let avx2 = Avx2::detect()?;
        std::is_x86_feature_detected!("avx512f").then_some(Self { avx2 })
    }

    /// AVX-512 implies AVX2 and FMA.
    pub fn avx2(self) -> Avx2 {
        self.avx2
    }
}

/// Proof that this CPU has NEON (Advanced SIMD; every ARM64 CPU that Linux runs on has it, but
/// it is detected like the x86 sets all the same).
#[cfg(target_arch = "aarch64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neon {
    _detected: (),
}

#[cfg(target_arch = "aarch64")]
impl Neon {
    /// The token, if this CPU has NEON.
    pub fn detect() -> Option<Self> {
        std::arch::is_aarch64_feature_detected!("neon").then_some(Self { _detected: () })
    }
}

/// An instruction set of the kernels, with the token that proves the CPU has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust (`mul_add` chains, auto-vectorised elementwise loops).
    Scalar,
    /// 8-lane AVX2 + FMA micro-kernels (6 × 16 tiles), AVX2 clones of the elementwise loops.
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
    /// 16-lane AVX-512 micro-kernels (12 × 16 and 12 × 32 tiles), AVX-512 softmax, GELU,
    /// LayerNorm and panel transposes; AVX2 elsewhere.
    #[cfg(target_arch = "x86_64")]
    Avx512(Avx512),
    /// 4-lane NEON micro-kernels (6 × 16 tiles), NEON softmax, GELU, add + LayerNorm and panel
    /// transposes (ARM64; tested under emulation, not measured).
    #[cfg(target_arch = "aarch64")]
    Neon(Neon),
}

/// The environment variable that overrides the instruction set: `avx512`, `avx2`, `neon`,
/// `portable`, or `auto` (the default: the widest this CPU has).
pub const ISA_ENV: &str = "BAYESLORA_ISA";

/// What [`ISA_ENV`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsaRequest {
    /// The widest set this CPU has (unset, empty or `auto`).
    Auto,
    /// AVX-512F (with AVX2 and FMA).
    Avx512,
    /// AVX2 and FMA.
    Avx2,
    /// NEON (ARM64).
    Neon,
    /// The portable Rust kernels, on any CPU.
    Portable,
}

/// [`ISA_ENV`] names an instruction set that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IsaError {
    /// Not one of the accepted names.
    #[error("{ISA_ENV}={value:?} is not one of auto, avx512, avx2, neon, portable")]
    Unknown {
        /// The value as given (lossily decoded when it is not UTF-8).
        value: String,
    },
    /// A set this CPU does not have: never replaced by a narrower one.
    #[error("{ISA_ENV}={requested} but this CPU lacks {missing}")]
    Unsupported {
        /// The set asked for (`"avx512"`, `"avx2"`, `"neon"`).
        requested: &'static str,
        /// The CPU features it needs that are missing, comma-separated (`"avx512f"`).
        missing: String,
    },
}

impl IsaRequest {
    /// The request in a value of [`ISA_ENV`]: `None` (unset) and `""` are [`IsaRequest::Auto`];
    /// names are matched without regard to case or surrounding blanks.
    pub fn parse(value: Option<&str>) -> Result<Self, IsaError> {
        let Some(raw) = value else {
            return Ok(Self::Auto);
        };
        match raw.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "avx512" => Ok(Self::Avx512),
            "avx2" => Ok(Self::Avx2),
            "neon" => Ok(Self::Neon),
            "portable" => Ok(Self::Portable),
            _ => Err(IsaError::Unknown {
                value: raw.to_owned(),
            }),
        }
    }

    /// The request of this process's environment.
    pub fn from_env() -> Result<Self, IsaError> {
        match std::env::var_os(ISA_ENV) {
            None => Self::parse(None),
            Some(v) => match v.to_str() {
                Some(s) => Self::parse(Some(s)),
                None => Err(IsaError::Unknown {
                    value: v.to_string_lossy().into_owned(),
                }),
            },
        }
    }
}

/// The CPU facts an [`Isa`] is chosen from: the tokens this CPU can make, and a test of each
/// feature by name (to say which ones are missing).
#[derive(Clone, Copy)]
pub struct Cpu<'a> {
    /// The AVX2 token, if this CPU has AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    pub avx2: Option<Avx2>,
    /// The AVX-512 token, if this CPU has AVX-512F, AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    pub avx512: Option<Avx512>,
    /// The NEON token, if this CPU has NEON.
    #[cfg(target_arch = "aarch64")]
    pub neon: Option<Neon>,
    /// Whether this CPU has a feature (`"avx2"`, `"fma"`, `"avx512f"`, `"neon"`).
    pub has: &'a dyn Fn(&str) -> bool,
}

impl Cpu<'static> {
    /// This CPU, detected now.
    pub fn detect() -> Self {
        Cpu {
            #[cfg(target_arch = "x86_64")]
            avx2: Avx2::detect(),
            #[cfg(target_arch = "x86_64")]
            avx512: Avx512::detect(),
            #[cfg(target_arch = "aarch64")]
            neon: Neon::detect(),
            has: &has_feature,
        }
    }
}

/// Whether this CPU has the named x86 or ARM64 feature (`false` for any other name, or a
/// feature of another architecture).
fn has_feature(name: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match name {
            "avx2" => std::is_x86_feature_detected!("avx2"),
            "fma" => std::is_x86_feature_detected!("fma"),
            "avx512f" => std::is_x86_feature_detected!("avx512f"),
            _ => false,
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        match name {
            "neon" => std::arch::is_aarch64_feature_detected!("neon"),
            _ => false,
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = name;
        false
    }
}

impl Isa {
    /// The widest instruction set of this CPU, detected now.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(t) = Avx512::detect() {
                return Isa::Avx512(t);
            }
            if let Some(t) = Avx2::detect() {
                return Isa::Avx2(t);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(t) = Neon::detect() {
            return Isa::Neon(t);
        }
        Isa::Scalar
    }

    /// The set `request` names on `cpu`: the widest for [`IsaRequest::Auto`], else exactly the
    /// one asked for, or [`IsaError::Unsupported`] naming the features `cpu` lacks.
    pub fn choose(request: IsaRequest, cpu: &Cpu<'_>) -> Result<Self, IsaError> {
        let unsupported = |requested: &'static str, needs: &[&str]| {
            let missing: Vec<&str> = needs.iter().copied().filter(|f| !(cpu.has)(f)).collect();
            let missing = if missing.is_empty() {
                // the features are there but no token was made (an OS that keeps the AVX-512
                // registers off): say what is asked for
                needs.join(", ")
            } else {
                missing.join(", ")
            };
            IsaError::Unsupported { requested, missing }
        };
        match request {
            IsaRequest::Portable => Ok(Isa::Scalar),
            IsaRequest::Auto => {
                #[cfg(target_arch = "x86_64")]
                {
                    if let Some(t) = cpu.avx512 {
                        return Ok(Isa::Avx512(t));
                    }
                    if let Some(t) = cpu.avx2 {
                        return Ok(Isa::Avx2(t));
                    }
                }
                #[cfg(target_arch = "aarch64")]
                if let Some(t) = cpu.neon {
                    return Ok(Isa::Neon(t));
                }
                Ok(Isa::Scalar)
            }
            IsaRequest::Avx2 => {
                #[cfg(target_arch = "x86_64")]
                if let Some(t) = cpu.avx2 {
                    return Ok(Isa::Avx2(t));
                }
                Err(unsupported("avx2", &["avx2", "fma"]))
            }
            IsaRequest::Avx512 => {
                #[cfg(target_arch = "x86_64")]
                if let Some(t) = cpu.avx512 {
                    return Ok(Isa::Avx512(t));
                }
                Err(unsupported("avx512", &["avx512f", "avx2", "fma"]))
            }
            IsaRequest::Neon => {
                #[cfg(target_arch = "aarch64")]
                if let Some(t) = cpu.neon {
                    return Ok(Isa::Neon(t));
                }
                Err(unsupported("neon", &["neon"]))
            }
        }
    }

    /// The choice of this process: [`ISA_ENV`] read and this CPU detected on the first call,
    /// the answer kept for the life of the process.
    fn process_choice() -> &'static Result<Isa, IsaError> {
        static CHOICE: OnceLock<Result<Isa, IsaError>> = OnceLock::new();
        CHOICE.get_or_init(|| Self::choose(IsaRequest::from_env()?, &Cpu::detect()))
    }

    /// The set of this process, or why [`ISA_ENV`] cannot be followed.
    pub fn selected() -> Result<Self, IsaError> {
        Self::process_choice().clone()
    }

    /// The set the kernels of this process run on ([`Isa::selected`]). When [`ISA_ENV`] is
    /// unusable the entry points that run kernels have already refused to start, so this is
    /// reached only by a caller of a bare kernel, which then runs the portable set: correct on
    /// any CPU, and never a wider set than the variable asked for.
    #[inline]
    pub fn get() -> Self {
        match Self::process_choice() {
            Ok(isa) => *isa,
            Err(_) => Isa::Scalar,
        }
    }

    /// Every instruction set this CPU can run, narrowest first ([`Isa::Scalar`] always).
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut out = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            out.extend(Avx2::detect().map(Isa::Avx2));
            out.extend(Avx512::detect().map(Isa::Avx512));
        }
        #[cfg(target_arch = "aarch64")]
        out.extend(Neon::detect().map(Isa::Neon));
        out
    }

    /// The AVX2 token, when this set includes AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn avx2(self) -> Option<Avx2> {
        match self {
            Isa::Scalar => None,
            Isa::Avx2(t) => Some(t),
            Isa::Avx512(t) => Some(t.avx2()),
        }
    }

    /// The AVX-512 token, when this set is AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn avx512(self) -> Option<Avx512> {
        match self {
            Isa::Avx512(t) => Some(t),
            _ => None,
        }
    }

    /// The NEON token, when this set is NEON.
    #[cfg(target_arch = "aarch64")]
    #[inline]
    pub fn neon(self) -> Option<Neon> {
        match self {
            Isa::Neon(t) => Some(t),
            Isa::Scalar => None,
        }
    }

    /// A short name, as [`ISA_ENV`] takes it (`"portable"`, `"avx2"`, `"avx512"`, `"neon"`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "portable",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(_) => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(_) => "avx512",
            #[cfg(target_arch = "aarch64")]
            Isa::Neon(_) => "neon",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_names_and_refuses_others() {
        assert_eq!(IsaRequest::parse(None), Ok(IsaRequest::Auto));
        for (value, want) in [
            ("", IsaRequest::Auto),
            ("auto", IsaRequest::Auto),
            ("avx512", IsaRequest::Avx512),
            (" AVX2\n", IsaRequest::Avx2),
            ("portable", IsaRequest::Portable),
            ("Portable", IsaRequest::Portable),
            ("neon", IsaRequest::Neon),
            ("NEON ", IsaRequest::Neon),
        ] {
            assert_eq!(IsaRequest::parse(Some(value)), Ok(want), "{value:?}");
        }
        for value in [
            "sse2", "avx-512", "scalar", "native", "avx2,fma", "0", "asimd", "sve",
        ] {
            let err = IsaRequest::parse(Some(value)).expect_err(value);
            assert_eq!(
                err.to_string(),
                format!("BAYESLORA_ISA={value:?} is not one of auto, avx512, avx2, neon, portable")
            );
        }
        // every set's name is a value the variable takes
        for isa in Isa::available() {
            assert!(
                IsaRequest::parse(Some(isa.name())).is_ok(),
                "{}",
                isa.name()
            );
        }
    }

    #[test]
    fn a_cpu_without_the_set_is_an_error_never_a_narrower_set() {
        let none = Cpu {
            #[cfg(target_arch = "x86_64")]
            avx2: None,
            #[cfg(target_arch = "x86_64")]
            avx512: None,
            #[cfg(target_arch = "aarch64")]
            neon: None,
            has: &|_| false,
        };
        assert_eq!(Isa::choose(IsaRequest::Auto, &none), Ok(Isa::Scalar));
        assert_eq!(Isa::choose(IsaRequest::Portable, &none), Ok(Isa::Scalar));
        let err = Isa::choose(IsaRequest::Avx2, &none).expect_err("no avx2");
        assert_eq!(
            err.to_string(),
            "BAYESLORA_ISA=avx2 but this CPU lacks avx2, fma"
        );
        let err = Isa::choose(IsaRequest::Avx512, &none).expect_err("no avx512");
        assert_eq!(
            err.to_string(),
            "BAYESLORA_ISA=avx512 but this CPU lacks avx512f, avx2, fma"
        );
        let err = Isa::choose(IsaRequest::Neon, &none).expect_err("no neon");
        assert_eq!(
            err.to_string(),
            "BAYESLORA_ISA=neon but this CPU lacks neon"
        );
        // an ARM64 CPU: NEON, and an error for the x86 sets (the real token where this CPU
        // can make one)
        let arm = Cpu {
            #[cfg(target_arch = "x86_64")]
            avx2: None,
            #[cfg(target_arch = "x86_64")]
            avx512: None,
            #[cfg(target_arch = "aarch64")]
            neon: Neon::detect(),
            has: &|f| f == "neon",
        };
        let err = Isa::choose(IsaRequest::Avx2, &arm).expect_err("no avx2 on ARM");
        assert_eq!(
            err.to_string(),
            "BAYESLORA_ISA=avx2 but this CPU lacks avx2, fma"
        );
        #[cfg(target_arch = "aarch64")]
        if let Some(t) = Neon::detect() {
            assert_eq!(Isa::choose(IsaRequest::Auto, &arm), Ok(Isa::Neon(t)));
            assert_eq!(Isa::choose(IsaRequest::Neon, &arm), Ok(Isa::Neon(t)));
        }
        // AVX2 without AVX-512 (the real AVX2 token where this CPU can make one)
        let avx2_only = Cpu {
            #[cfg(target_arch = "x86_64")]
            avx2: Avx2::detect(),
            #[cfg(target_arch = "x86_64")]
            avx512: None,
            #[cfg(target_arch = "aarch64")]
            neon: None,
            has: &|f| f != "avx512f",
        };
        let err = Isa::choose(IsaRequest::Avx512, &avx2_only).expect_err("no avx512");
        assert_eq!(
            err,
            IsaError::Unsupported {
                requested: "avx512",
                missing: "avx512f".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "BAYESLORA_ISA=avx512 but this CPU lacks avx512f"
        );
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = Avx2::detect() {
            assert_eq!(Isa::choose(IsaRequest::Auto, &avx2_only), Ok(Isa::Avx2(t)));
            assert_eq!(Isa::choose(IsaRequest::Avx2, &avx2_only), Ok(Isa::Avx2(t)));
        }
        // features reported but no token (registers kept off by the OS): what is asked for
        let off = Cpu {
            #[cfg(target_arch = "x86_64")]
            avx2: None,
            #[cfg(target_arch = "x86_64")]
            avx512: None,
            #[cfg(target_arch = "aarch64")]
            neon: None,
            has: &|_| true,
        };
        let err = Isa::choose(IsaRequest::Avx2, &off).expect_err("no token");
        assert_eq!(
            err.to_string(),
            "BAYESLORA_ISA=avx2 but this CPU lacks avx2, fma"
        );
    }

    #[test]
    fn this_cpu_runs_every_set_it_has_when_asked() {
        let cpu = Cpu::detect();
        assert_eq!(Isa::choose(IsaRequest::Auto, &cpu), Ok(Isa::detect()));
        for isa in Isa::available() {
            let request = IsaRequest::parse(Some(isa.name())).expect("a name");
            assert_eq!(Isa::choose(request, &cpu), Ok(isa));
        }
        // this process's choice follows the variable of the test run (unset: the widest)
        match IsaRequest::from_env() {
            Ok(request) => assert_eq!(Isa::selected(), Isa::choose(request, &cpu)),
            Err(e) => assert_eq!(Isa::selected(), Err(e)),
        }
    }
}
