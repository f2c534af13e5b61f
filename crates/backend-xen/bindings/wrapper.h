/* The parts of libxenctrl, libxenguest, libxenforeignmemory and libxenevtchn the backend uses. */
#define __XEN_TOOLS__ 1
#include <xenctrl.h>
#include <xenforeignmemory.h>
#include <xenevtchn.h>
#include <xen/vm_event.h>
#include <xenguest.h>
#include <xen/hvm/params.h>
#include <xen/hvm/save.h>
/* Exported by libxenctrl (VERS_4.17.0) but declared only in its private
 * header: the page types (XEN_DOMCTL_PFINFO_*) of a batch of frames, in
 * place. */
int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num, xen_pfn_t *arr);
