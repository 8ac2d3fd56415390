//! A number that changes when the layout of a type crossing the ABI
//! changes: the hash of abi_stable's description of the type and of every
//! type it reaches.
//!
//! Each side computes it from its own copy of the types and only the number
//! crosses the boundary, so unlike abi_stable's layout checker (whose
//! process-wide cache keeps pointers taken from the checked layouts) nothing
//! can keep a pointer into a library after it was closed.
//!
//! What is hashed: for each type, its name with its generic arguments, size,
//! alignment and kind (primitive, struct, enum...), the names and type names
//! of its fields, the variants of an enum, and the parameter and return types
//! of function pointers; then every type it refers to, each once. What is
//! not: the module a type lives in and its crate's version, which do not
//! change a layout. The hash is FNV-1a rather than std's `DefaultHasher`,
//! whose output may change between Rust releases: a host and a plugin built
//! by different compilers must agree.
//!
//! Nothing here formats abi_stable types with `Display` or `Debug`: those
//! use thread-locals, and a thread-local the plugin registers on a host
//! thread would keep the library mapped.

use std::collections::HashSet;

use abi_stable::std_types::UTypeId;
use abi_stable::type_layout::{TLData, TLFields, TLPrefixType, TypeLayout};

/// The fingerprint of `layout`, and of every type it refers to.
pub(crate) fn of(layout: &'static TypeLayout) -> u64 {
    let mut walk = Walk {
        hash: Fnv1a::default(),
        visited: HashSet::new(),
    };
    walk.layout(layout);
    walk.hash.0
}

struct Walk {
    hash: Fnv1a,
    /// Types already hashed, by type id rather than by the layout's
    /// address (one build may hold several copies of a type's layout, and
    /// the walk must not depend on which one it meets) or by name (which
    /// abi_stable gives without type arguments: `RVec<u8>` and
    /// `RVec<FfiHeader>` are both `RVec`). It also ends cycles (`RVec<T>`'s
    /// vtable takes an `RVec<T>`).
    visited: HashSet<UTypeId>,
}

impl Walk {
    fn layout(&mut self, layout: &'static TypeLayout) {
        if !self.visited.insert(layout.get_utypeid()) {
            return;
        }
        self.hash.str(&full_name(layout));
        self.hash.num(layout.size());
        self.hash.num(layout.alignment());
        self.hash.num(layout.data_discriminant() as usize);
        match layout.data() {
            TLData::Primitive(_) | TLData::Opaque => {}
            TLData::Struct { fields }
            | TLData::Union { fields }
            | TLData::PrefixType(TLPrefixType { fields, .. }) => self.fields(fields),
            TLData::Enum(enum_) => {
                for variant in enum_.variant_names_iter() {
                    self.hash.str(variant);
                }
                for &count in enum_.field_count.iter() {
                    self.hash.num(count.into());
                }
                self.fields(enum_.fields);
            }
        }
        for referenced in layout.shared_vars().type_layouts() {
            self.layout(referenced());
        }
    }

    fn fields(&mut self, fields: TLFields) {
        for field in fields.iter() {
            self.hash.str(field.name());
            self.hash.str(&full_name(field.layout()));
            for function in field.function_range().iter() {
                self.hash.str(function.param_names.as_str());
                for param in function.param_type_layouts.iter() {
                    self.hash.str(&full_name(param()));
                }
                if let Some(returns) = function.return_type_layout() {
                    self.hash.str(&full_name(returns()));
                }
            }
        }
    }
}

/// A type's name with the lifetimes and type arguments abi_stable records
/// (`FfiRequest<'a>`, `*const<u8>`), which its `name()` leaves out. The
/// module path is left out on purpose: moving a type does not change its
/// layout.
fn full_name(layout: &'static TypeLayout) -> String {
    let generics = layout.generics();
    let arguments: Vec<String> = generics
        .lifetimes()
        .map(str::to_owned)
        .chain(
            generics
                .type_params()
                .iter()
                .map(|param| full_name(param())),
        )
        .collect();
    if arguments.is_empty() {
        layout.name().to_owned()
    } else {
        format!("{}<{}>", layout.name(), arguments.join(", "))
    }
}

/// 64-bit FNV-1a: small, fixed, and the same in every build.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Length first, so that `("ab", "c")` and `("a", "bc")` differ.
    fn str(&mut self, s: &str) {
        self.num(s.len());
        self.bytes(s.as_bytes());
    }

    fn num(&mut self, n: usize) {
        self.bytes(&(n as u64).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use abi_stable::StableAbi;
    use abi_stable::std_types::RVec;

    use super::of;

    mod original {
        use abi_stable::StableAbi;
        use abi_stable::std_types::RString;

        #[repr(C)]
        #[derive(StableAbi)]
        pub struct Entry {
            pub key: RString,
            pub count: u32,
        }
    }

    /// `original::Entry` declared again in another module.
    mod same {
        use abi_stable::StableAbi;
        use abi_stable::std_types::RString;

        #[repr(C)]
        #[derive(StableAbi)]
        pub struct Entry {
            pub key: RString,
            pub count: u32,
        }
    }

    /// `original::Entry` with one field's type changed, size and alignment
    /// unchanged.
    mod wider {
        use abi_stable::StableAbi;
        use abi_stable::std_types::RString;

        #[repr(C)]
        #[derive(StableAbi)]
        pub struct Entry {
            pub key: RString,
            pub count: u64,
        }
    }

    /// `original::Entry` with one field renamed.
    mod renamed {
        use abi_stable::StableAbi;
        use abi_stable::std_types::RString;

        #[repr(C)]
        #[derive(StableAbi)]
        pub struct Entry {
            pub key: RString,
            pub total: u32,
        }
    }

    #[test]
    fn stable_within_a_build_and_independent_of_the_module() {
        let original = of(<original::Entry as StableAbi>::LAYOUT);
        assert_eq!(original, of(<original::Entry as StableAbi>::LAYOUT));
        assert_eq!(original, of(<same::Entry as StableAbi>::LAYOUT));
        assert_eq!(
            of(crate::ffi::PluginDescriptor::LAYOUT),
            crate::ffi::layout_fingerprint()
        );
    }

    #[test]
    fn changes_when_a_field_changes() {
        assert_eq!(
            std::mem::size_of::<original::Entry>(),
            std::mem::size_of::<wider::Entry>()
        );
        let original = of(<original::Entry as StableAbi>::LAYOUT);
        assert_ne!(original, of(<wider::Entry as StableAbi>::LAYOUT));
        assert_ne!(original, of(<renamed::Entry as StableAbi>::LAYOUT));
    }

    /// Two `RVec`s of different element types: abi_stable names both
    /// `RVec`, and the second one's elements must be hashed all the same.
    #[repr(C)]
    #[derive(StableAbi)]
    struct Lists<T> {
        bytes: RVec<u8>,
        entries: RVec<T>,
    }

    #[test]
    fn reaches_every_type_inside_containers() {
        assert_ne!(
            of(<Lists<original::Entry> as StableAbi>::LAYOUT),
            of(<Lists<wider::Entry> as StableAbi>::LAYOUT)
        );
    }
}
