/* The parts of libxenctrl, libxenguest and libxenforeignmemory the backend uses. */
#define __XEN_TOOLS__ 1
#include <xenctrl.h>
#include <xenforeignmemory.h>
#include <xenguest.h>
#include <xen/hvm/params.h>
#include <xen/hvm/save.h>
