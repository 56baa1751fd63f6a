from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Prot(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROT_UNSPECIFIED: _ClassVar[Prot]
    PROT_R: _ClassVar[Prot]
    PROT_RW: _ClassVar[Prot]
    PROT_NONE: _ClassVar[Prot]

class UffdMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UFFD_MODE_NONE: _ClassVar[UffdMode]
    UFFD_MODE_MISSING: _ClassVar[UffdMode]
    UFFD_MODE_WP: _ClassVar[UffdMode]
    UFFD_MODE_MISSING_WP: _ClassVar[UffdMode]

class Advice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADVICE_UNSPECIFIED: _ClassVar[Advice]
    ADVICE_DONTFORK: _ClassVar[Advice]
    ADVICE_DOFORK: _ClassVar[Advice]
    ADVICE_WIPEONFORK: _ClassVar[Advice]
    ADVICE_KEEPONFORK: _ClassVar[Advice]
    ADVICE_DONTNEED: _ClassVar[Advice]
    ADVICE_COLD: _ClassVar[Advice]
    ADVICE_PAGEOUT: _ClassVar[Advice]
    ADVICE_HUGEPAGE: _ClassVar[Advice]
    ADVICE_NOHUGEPAGE: _ClassVar[Advice]

class FillMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILL_MODE_NONE: _ClassVar[FillMode]
    FILL_MODE_DONTWAKE: _ClassVar[FillMode]
    FILL_MODE_WP: _ClassVar[FillMode]

class RemapMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REMAP_MODE_NONE: _ClassVar[RemapMode]
    REMAP_MODE_DONTWAKE: _ClassVar[RemapMode]
    REMAP_MODE_ALLOW_SRC_HOLES: _ClassVar[RemapMode]

class ShardState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARD_STATE_UNSPECIFIED: _ClassVar[ShardState]
    SHARD_STATE_SERVING: _ClassVar[ShardState]
    SHARD_STATE_DOWN: _ClassVar[ShardState]
PROT_UNSPECIFIED: Prot
PROT_R: Prot
PROT_RW: Prot
PROT_NONE: Prot
UFFD_MODE_NONE: UffdMode
UFFD_MODE_MISSING: UffdMode
UFFD_MODE_WP: UffdMode
UFFD_MODE_MISSING_WP: UffdMode
ADVICE_UNSPECIFIED: Advice
ADVICE_DONTFORK: Advice
ADVICE_DOFORK: Advice
ADVICE_WIPEONFORK: Advice
ADVICE_KEEPONFORK: Advice
ADVICE_DONTNEED: Advice
ADVICE_COLD: Advice
ADVICE_PAGEOUT: Advice
ADVICE_HUGEPAGE: Advice
ADVICE_NOHUGEPAGE: Advice
FILL_MODE_NONE: FillMode
FILL_MODE_DONTWAKE: FillMode
FILL_MODE_WP: FillMode
REMAP_MODE_NONE: RemapMode
REMAP_MODE_DONTWAKE: RemapMode
REMAP_MODE_ALLOW_SRC_HOLES: RemapMode
SHARD_STATE_UNSPECIFIED: ShardState
SHARD_STATE_SERVING: ShardState
SHARD_STATE_DOWN: ShardState

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateProcessRequest(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: int
    def __init__(self, shard: _Optional[int] = ...) -> None: ...

class Process(_message.Message):
    __slots__ = ("handle", "pid")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    handle: str
    pid: int
    def __init__(self, handle: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class ProcessRequest(_message.Message):
    __slots__ = ("process",)
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    process: str
    def __init__(self, process: _Optional[str] = ...) -> None: ...

class ExitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MmapRequest(_message.Message):
    __slots__ = ("process", "length", "prot", "addr", "uffd")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROT_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    UFFD_FIELD_NUMBER: _ClassVar[int]
    process: str
    length: int
    prot: Prot
    addr: int
    uffd: UffdMode
    def __init__(self, process: _Optional[str] = ..., length: _Optional[int] = ..., prot: _Optional[_Union[Prot, str]] = ..., addr: _Optional[int] = ..., uffd: _Optional[_Union[UffdMode, str]] = ...) -> None: ...

class Vma(_message.Message):
    __slots__ = ("start", "end", "prot", "uffd", "dontfork", "wipeonfork", "pgoff", "anon_vma")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PROT_FIELD_NUMBER: _ClassVar[int]
    UFFD_FIELD_NUMBER: _ClassVar[int]
    DONTFORK_FIELD_NUMBER: _ClassVar[int]
    WIPEONFORK_FIELD_NUMBER: _ClassVar[int]
    PGOFF_FIELD_NUMBER: _ClassVar[int]
    ANON_VMA_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    prot: Prot
    uffd: UffdMode
    dontfork: bool
    wipeonfork: bool
    pgoff: int
    anon_vma: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., prot: _Optional[_Union[Prot, str]] = ..., uffd: _Optional[_Union[UffdMode, str]] = ..., dontfork: _Optional[bool] = ..., wipeonfork: _Optional[bool] = ..., pgoff: _Optional[int] = ..., anon_vma: _Optional[int] = ...) -> None: ...

class RangeRequest(_message.Message):
    __slots__ = ("process", "addr", "length")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    process: str
    addr: int
    length: int
    def __init__(self, process: _Optional[str] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class MprotectRequest(_message.Message):
    __slots__ = ("process", "addr", "length", "prot")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROT_FIELD_NUMBER: _ClassVar[int]
    process: str
    addr: int
    length: int
    prot: Prot
    def __init__(self, process: _Optional[str] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., prot: _Optional[_Union[Prot, str]] = ...) -> None: ...

class MremapRequest(_message.Message):
    __slots__ = ("process", "addr", "old_length", "new_length", "maymove", "dontunmap", "fixed")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    OLD_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NEW_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAYMOVE_FIELD_NUMBER: _ClassVar[int]
    DONTUNMAP_FIELD_NUMBER: _ClassVar[int]
    FIXED_FIELD_NUMBER: _ClassVar[int]
    process: str
    addr: int
    old_length: int
    new_length: int
    maymove: bool
    dontunmap: bool
    fixed: int
    def __init__(self, process: _Optional[str] = ..., addr: _Optional[int] = ..., old_length: _Optional[int] = ..., new_length: _Optional[int] = ..., maymove: _Optional[bool] = ..., dontunmap: _Optional[bool] = ..., fixed: _Optional[int] = ...) -> None: ...

class UffdCopyRequest(_message.Message):
    __slots__ = ("process", "dst", "len", "values", "mode")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    LEN_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    process: str
    dst: int
    len: int
    values: _containers.RepeatedScalarFieldContainer[int]
    mode: int
    def __init__(self, process: _Optional[str] = ..., dst: _Optional[int] = ..., len: _Optional[int] = ..., values: _Optional[_Iterable[int]] = ..., mode: _Optional[int] = ...) -> None: ...

class UffdCopyResponse(_message.Message):
    __slots__ = ("copied",)
    COPIED_FIELD_NUMBER: _ClassVar[int]
    copied: int
    def __init__(self, copied: _Optional[int] = ...) -> None: ...

class UffdZeropageRequest(_message.Message):
    __slots__ = ("process", "dst", "len", "mode")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    LEN_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    process: str
    dst: int
    len: int
    mode: int
    def __init__(self, process: _Optional[str] = ..., dst: _Optional[int] = ..., len: _Optional[int] = ..., mode: _Optional[int] = ...) -> None: ...

class UffdZeropageResponse(_message.Message):
    __slots__ = ("zeroed",)
    ZEROED_FIELD_NUMBER: _ClassVar[int]
    zeroed: int
    def __init__(self, zeroed: _Optional[int] = ...) -> None: ...

class UserfaultsRequest(_message.Message):
    __slots__ = ("process", "nonblocking")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    NONBLOCKING_FIELD_NUMBER: _ClassVar[int]
    process: str
    nonblocking: bool
    def __init__(self, process: _Optional[str] = ..., nonblocking: _Optional[bool] = ...) -> None: ...

class ListUserfaultsResponse(_message.Message):
    __slots__ = ("queued", "waiting")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    queued: _containers.RepeatedCompositeFieldContainer[UserfaultEvent]
    waiting: _containers.RepeatedCompositeFieldContainer[UserfaultEvent]
    def __init__(self, queued: _Optional[_Iterable[_Union[UserfaultEvent, _Mapping]]] = ..., waiting: _Optional[_Iterable[_Union[UserfaultEvent, _Mapping]]] = ...) -> None: ...

class UserfaultEvent(_message.Message):
    __slots__ = ("addr", "write", "wp")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    WRITE_FIELD_NUMBER: _ClassVar[int]
    WP_FIELD_NUMBER: _ClassVar[int]
    addr: int
    write: bool
    wp: bool
    def __init__(self, addr: _Optional[int] = ..., write: _Optional[bool] = ..., wp: _Optional[bool] = ...) -> None: ...

class MadviseRequest(_message.Message):
    __slots__ = ("process", "addr", "length", "advice")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    process: str
    addr: int
    length: int
    advice: Advice
    def __init__(self, process: _Optional[str] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., advice: _Optional[_Union[Advice, str]] = ...) -> None: ...

class UffdRegisterRequest(_message.Message):
    __slots__ = ("process", "addr", "length", "mode")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    process: str
    addr: int
    length: int
    mode: UffdMode
    def __init__(self, process: _Optional[str] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., mode: _Optional[_Union[UffdMode, str]] = ...) -> None: ...

class AccessRequest(_message.Message):
    __slots__ = ("process", "addr")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    process: str
    addr: int
    def __init__(self, process: _Optional[str] = ..., addr: _Optional[int] = ...) -> None: ...

class ReadResponse(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: int
    def __init__(self, value: _Optional[int] = ...) -> None: ...

class WriteRequest(_message.Message):
    __slots__ = ("process", "addr", "value")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    process: str
    addr: int
    value: int
    def __init__(self, process: _Optional[str] = ..., addr: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...

class RemapRequest(_message.Message):
    __slots__ = ("process", "dst", "src", "len", "mode")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    LEN_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    process: str
    dst: int
    src: int
    len: int
    mode: int
    def __init__(self, process: _Optional[str] = ..., dst: _Optional[int] = ..., src: _Optional[int] = ..., len: _Optional[int] = ..., mode: _Optional[int] = ...) -> None: ...

class RemapResponse(_message.Message):
    __slots__ = ("moved",)
    MOVED_FIELD_NUMBER: _ClassVar[int]
    moved: int
    def __init__(self, moved: _Optional[int] = ...) -> None: ...

class WalkRequest(_message.Message):
    __slots__ = ("process", "addr", "blocking")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    BLOCKING_FIELD_NUMBER: _ClassVar[int]
    process: str
    addr: int
    blocking: bool
    def __init__(self, process: _Optional[str] = ..., addr: _Optional[int] = ..., blocking: _Optional[bool] = ...) -> None: ...

class Mapping(_message.Message):
    __slots__ = ("addr", "pid")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    addr: int
    pid: int
    def __init__(self, addr: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class WalkResponse(_message.Message):
    __slots__ = ("referenced", "contended", "mappings", "fast_retries", "slow_retries")
    REFERENCED_FIELD_NUMBER: _ClassVar[int]
    CONTENDED_FIELD_NUMBER: _ClassVar[int]
    MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    FAST_RETRIES_FIELD_NUMBER: _ClassVar[int]
    SLOW_RETRIES_FIELD_NUMBER: _ClassVar[int]
    referenced: int
    contended: bool
    mappings: _containers.RepeatedCompositeFieldContainer[Mapping]
    fast_retries: int
    slow_retries: int
    def __init__(self, referenced: _Optional[int] = ..., contended: _Optional[bool] = ..., mappings: _Optional[_Iterable[_Union[Mapping, _Mapping]]] = ..., fast_retries: _Optional[int] = ..., slow_retries: _Optional[int] = ...) -> None: ...

class ReclaimRequest(_message.Message):
    __slots__ = ("pages",)
    PAGES_FIELD_NUMBER: _ClassVar[int]
    pages: int
    def __init__(self, pages: _Optional[int] = ...) -> None: ...

class ReclaimResponse(_message.Message):
    __slots__ = ("reclaimed",)
    RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    reclaimed: int
    def __init__(self, reclaimed: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("process", "addr", "length")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    process: str
    addr: int
    length: int
    def __init__(self, process: _Optional[str] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("pin", "pages")
    PIN_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    pin: int
    pages: int
    def __init__(self, pin: _Optional[int] = ..., pages: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("process", "pin")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    process: str
    pin: int
    def __init__(self, process: _Optional[str] = ..., pin: _Optional[int] = ...) -> None: ...

class PagemapEntry(_message.Message):
    __slots__ = ("present", "swap", "exclusive", "uffd_wp", "soft_dirty", "swapcache", "pmd", "thp", "head", "tail", "zero_page", "ksm", "anon_exclusive", "mapcount")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    SWAP_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    UFFD_WP_FIELD_NUMBER: _ClassVar[int]
    SOFT_DIRTY_FIELD_NUMBER: _ClassVar[int]
    SWAPCACHE_FIELD_NUMBER: _ClassVar[int]
    PMD_FIELD_NUMBER: _ClassVar[int]
    THP_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    ZERO_PAGE_FIELD_NUMBER: _ClassVar[int]
    KSM_FIELD_NUMBER: _ClassVar[int]
    ANON_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    MAPCOUNT_FIELD_NUMBER: _ClassVar[int]
    present: bool
    swap: bool
    exclusive: bool
    uffd_wp: bool
    soft_dirty: bool
    swapcache: bool
    pmd: bool
    thp: bool
    head: bool
    tail: bool
    zero_page: bool
    ksm: bool
    anon_exclusive: bool
    mapcount: int
    def __init__(self, present: _Optional[bool] = ..., swap: _Optional[bool] = ..., exclusive: _Optional[bool] = ..., uffd_wp: _Optional[bool] = ..., soft_dirty: _Optional[bool] = ..., swapcache: _Optional[bool] = ..., pmd: _Optional[bool] = ..., thp: _Optional[bool] = ..., head: _Optional[bool] = ..., tail: _Optional[bool] = ..., zero_page: _Optional[bool] = ..., ksm: _Optional[bool] = ..., anon_exclusive: _Optional[bool] = ..., mapcount: _Optional[int] = ...) -> None: ...

class PagemapResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[PagemapEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[PagemapEntry, _Mapping]]] = ...) -> None: ...

class FolioResponse(_message.Message):
    __slots__ = ("present", "zero_page", "value", "mapcount", "exclusive", "index", "anon_vma", "writable", "young", "order", "pmd", "pinned")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    ZERO_PAGE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MAPCOUNT_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ANON_VMA_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    YOUNG_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    PMD_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    present: bool
    zero_page: bool
    value: int
    mapcount: int
    exclusive: bool
    index: int
    anon_vma: int
    writable: bool
    young: bool
    order: int
    pmd: bool
    pinned: bool
    def __init__(self, present: _Optional[bool] = ..., zero_page: _Optional[bool] = ..., value: _Optional[int] = ..., mapcount: _Optional[int] = ..., exclusive: _Optional[bool] = ..., index: _Optional[int] = ..., anon_vma: _Optional[int] = ..., writable: _Optional[bool] = ..., young: _Optional[bool] = ..., order: _Optional[int] = ..., pmd: _Optional[bool] = ..., pinned: _Optional[bool] = ...) -> None: ...

class ListVmasResponse(_message.Message):
    __slots__ = ("vmas",)
    VMAS_FIELD_NUMBER: _ClassVar[int]
    vmas: _containers.RepeatedCompositeFieldContainer[Vma]
    def __init__(self, vmas: _Optional[_Iterable[_Union[Vma, _Mapping]]] = ...) -> None: ...

class AnonVmaTreeRequest(_message.Message):
    __slots__ = ("process", "addr")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    process: str
    addr: int
    def __init__(self, process: _Optional[str] = ..., addr: _Optional[int] = ...) -> None: ...

class AnonVma(_message.Message):
    __slots__ = ("id", "root", "parent", "refcount", "num_children", "num_active_vmas", "vmas")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    REFCOUNT_FIELD_NUMBER: _ClassVar[int]
    NUM_CHILDREN_FIELD_NUMBER: _ClassVar[int]
    NUM_ACTIVE_VMAS_FIELD_NUMBER: _ClassVar[int]
    VMAS_FIELD_NUMBER: _ClassVar[int]
    id: int
    root: int
    parent: int
    refcount: int
    num_children: int
    num_active_vmas: int
    vmas: _containers.RepeatedCompositeFieldContainer[Mapping]
    def __init__(self, id: _Optional[int] = ..., root: _Optional[int] = ..., parent: _Optional[int] = ..., refcount: _Optional[int] = ..., num_children: _Optional[int] = ..., num_active_vmas: _Optional[int] = ..., vmas: _Optional[_Iterable[_Union[Mapping, _Mapping]]] = ...) -> None: ...

class AnonVmaTreeResponse(_message.Message):
    __slots__ = ("anon_vmas",)
    ANON_VMAS_FIELD_NUMBER: _ClassVar[int]
    anon_vmas: _containers.RepeatedCompositeFieldContainer[AnonVma]
    def __init__(self, anon_vmas: _Optional[_Iterable[_Union[AnonVma, _Mapping]]] = ...) -> None: ...

class CheckInvariantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckInvariantsResponse(_message.Message):
    __slots__ = ("problems",)
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, problems: _Optional[_Iterable[str]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("counters", "protocol", "thp")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    THP_FIELD_NUMBER: _ClassVar[int]
    counters: _containers.ScalarMap[str, int]
    protocol: str
    thp: ThpSettings
    def __init__(self, counters: _Optional[_Mapping[str, int]] = ..., protocol: _Optional[str] = ..., thp: _Optional[_Union[ThpSettings, _Mapping]] = ...) -> None: ...

class ThpSettings(_message.Message):
    __slots__ = ("enabled", "use_zero_page", "sizes")
    class SizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    USE_ZERO_PAGE_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    enabled: str
    use_zero_page: bool
    sizes: _containers.ScalarMap[str, str]
    def __init__(self, enabled: _Optional[str] = ..., use_zero_page: _Optional[bool] = ..., sizes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Op(_message.Message):
    __slots__ = ("create_process", "fork", "exit", "mmap", "munmap", "madvise", "uffd_register", "uffd_unregister", "read", "write", "remap", "walk", "get_folio", "mprotect", "mremap", "uffd_copy", "uffd_zeropage", "uffd_wake", "reclaim", "pin", "unpin")
    CREATE_PROCESS_FIELD_NUMBER: _ClassVar[int]
    FORK_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    MMAP_FIELD_NUMBER: _ClassVar[int]
    MUNMAP_FIELD_NUMBER: _ClassVar[int]
    MADVISE_FIELD_NUMBER: _ClassVar[int]
    UFFD_REGISTER_FIELD_NUMBER: _ClassVar[int]
    UFFD_UNREGISTER_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    WRITE_FIELD_NUMBER: _ClassVar[int]
    REMAP_FIELD_NUMBER: _ClassVar[int]
    WALK_FIELD_NUMBER: _ClassVar[int]
    GET_FOLIO_FIELD_NUMBER: _ClassVar[int]
    MPROTECT_FIELD_NUMBER: _ClassVar[int]
    MREMAP_FIELD_NUMBER: _ClassVar[int]
    UFFD_COPY_FIELD_NUMBER: _ClassVar[int]
    UFFD_ZEROPAGE_FIELD_NUMBER: _ClassVar[int]
    UFFD_WAKE_FIELD_NUMBER: _ClassVar[int]
    RECLAIM_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    UNPIN_FIELD_NUMBER: _ClassVar[int]
    create_process: CreateProcessRequest
    fork: ProcessRequest
    exit: ProcessRequest
    mmap: MmapRequest
    munmap: RangeRequest
    madvise: MadviseRequest
    uffd_register: UffdRegisterRequest
    uffd_unregister: RangeRequest
    read: AccessRequest
    write: WriteRequest
    remap: RemapRequest
    walk: WalkRequest
    get_folio: AccessRequest
    mprotect: MprotectRequest
    mremap: MremapRequest
    uffd_copy: UffdCopyRequest
    uffd_zeropage: UffdZeropageRequest
    uffd_wake: RangeRequest
    reclaim: ReclaimRequest
    pin: PinRequest
    unpin: UnpinRequest
    def __init__(self, create_process: _Optional[_Union[CreateProcessRequest, _Mapping]] = ..., fork: _Optional[_Union[ProcessRequest, _Mapping]] = ..., exit: _Optional[_Union[ProcessRequest, _Mapping]] = ..., mmap: _Optional[_Union[MmapRequest, _Mapping]] = ..., munmap: _Optional[_Union[RangeRequest, _Mapping]] = ..., madvise: _Optional[_Union[MadviseRequest, _Mapping]] = ..., uffd_register: _Optional[_Union[UffdRegisterRequest, _Mapping]] = ..., uffd_unregister: _Optional[_Union[RangeRequest, _Mapping]] = ..., read: _Optional[_Union[AccessRequest, _Mapping]] = ..., write: _Optional[_Union[WriteRequest, _Mapping]] = ..., remap: _Optional[_Union[RemapRequest, _Mapping]] = ..., walk: _Optional[_Union[WalkRequest, _Mapping]] = ..., get_folio: _Optional[_Union[AccessRequest, _Mapping]] = ..., mprotect: _Optional[_Union[MprotectRequest, _Mapping]] = ..., mremap: _Optional[_Union[MremapRequest, _Mapping]] = ..., uffd_copy: _Optional[_Union[UffdCopyRequest, _Mapping]] = ..., uffd_zeropage: _Optional[_Union[UffdZeropageRequest, _Mapping]] = ..., uffd_wake: _Optional[_Union[RangeRequest, _Mapping]] = ..., reclaim: _Optional[_Union[ReclaimRequest, _Mapping]] = ..., pin: _Optional[_Union[PinRequest, _Mapping]] = ..., unpin: _Optional[_Union[UnpinRequest, _Mapping]] = ...) -> None: ...

class OpError(_message.Message):
    __slots__ = ("code", "message", "errno", "moved")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERRNO_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    errno: int
    moved: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., errno: _Optional[int] = ..., moved: _Optional[int] = ...) -> None: ...

class OpResult(_message.Message):
    __slots__ = ("error", "process", "empty", "vma", "read", "remap", "walk", "folio", "exit", "uffd_copy", "uffd_zeropage", "reclaim", "pin")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    EMPTY_FIELD_NUMBER: _ClassVar[int]
    VMA_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    REMAP_FIELD_NUMBER: _ClassVar[int]
    WALK_FIELD_NUMBER: _ClassVar[int]
    FOLIO_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    UFFD_COPY_FIELD_NUMBER: _ClassVar[int]
    UFFD_ZEROPAGE_FIELD_NUMBER: _ClassVar[int]
    RECLAIM_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    error: OpError
    process: Process
    empty: Empty
    vma: Vma
    read: ReadResponse
    remap: RemapResponse
    walk: WalkResponse
    folio: FolioResponse
    exit: ExitResponse
    uffd_copy: UffdCopyResponse
    uffd_zeropage: UffdZeropageResponse
    reclaim: ReclaimResponse
    pin: PinResponse
    def __init__(self, error: _Optional[_Union[OpError, _Mapping]] = ..., process: _Optional[_Union[Process, _Mapping]] = ..., empty: _Optional[_Union[Empty, _Mapping]] = ..., vma: _Optional[_Union[Vma, _Mapping]] = ..., read: _Optional[_Union[ReadResponse, _Mapping]] = ..., remap: _Optional[_Union[RemapResponse, _Mapping]] = ..., walk: _Optional[_Union[WalkResponse, _Mapping]] = ..., folio: _Optional[_Union[FolioResponse, _Mapping]] = ..., exit: _Optional[_Union[ExitResponse, _Mapping]] = ..., uffd_copy: _Optional[_Union[UffdCopyResponse, _Mapping]] = ..., uffd_zeropage: _Optional[_Union[UffdZeropageResponse, _Mapping]] = ..., reclaim: _Optional[_Union[ReclaimResponse, _Mapping]] = ..., pin: _Optional[_Union[PinResponse, _Mapping]] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("ops", "stop_on_error")
    OPS_FIELD_NUMBER: _ClassVar[int]
    STOP_ON_ERROR_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[Op]
    stop_on_error: bool
    def __init__(self, ops: _Optional[_Iterable[_Union[Op, _Mapping]]] = ..., stop_on_error: _Optional[bool] = ...) -> None: ...

class BatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[OpResult]
    def __init__(self, results: _Optional[_Iterable[_Union[OpResult, _Mapping]]] = ...) -> None: ...

class TopologyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("index", "address", "generation", "state", "metrics_address")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    index: int
    address: str
    generation: int
    state: ShardState
    metrics_address: str
    def __init__(self, index: _Optional[int] = ..., address: _Optional[str] = ..., generation: _Optional[int] = ..., state: _Optional[_Union[ShardState, str]] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class Topology(_message.Message):
    __slots__ = ("shards", "shard")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    shard: int
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., shard: _Optional[int] = ...) -> None: ...
